//! Typed wrappers over the datapath's maps, one module per map family (mirroring
//! `common`). They offer domain verbs; nothing outside this module touches a raw
//! map handle.

pub mod ifaces;
pub mod policy;
pub mod stats;
pub mod unparsed;
