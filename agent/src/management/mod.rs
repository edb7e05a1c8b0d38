//! The management API (SPEC §6): principals, confirmation and key changes that
//! take effect before the answer is sent.

pub mod principals;
