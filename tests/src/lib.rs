//! Helpers for keyfence's privileged tests: packet frames, the datapath's
//! reference model, and network-namespace hosts.

pub mod frames;
pub mod loaded;
pub mod netns;
pub mod refmodel;
