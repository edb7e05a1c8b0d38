//! Library target of the eBPF crate. It exists so that `agent/build.rs` can name
//! this crate as a build-dependency (cargo then rebuilds the object whenever this
//! crate or `keyfence-common` changes); the programs live in `main.rs`.
#![no_std]
