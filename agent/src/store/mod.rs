//! Durable key storage (SPEC §2 `store`, §6).
