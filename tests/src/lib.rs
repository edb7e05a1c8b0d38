//! Helpers for keyfence's privileged tests: packet frames, the datapath's
//! reference model, network-namespace hosts and HTTP peers, and wrk for the
//! benches.

pub mod bench;
pub mod frames;
pub mod http;
pub mod loaded;
pub mod netns;
pub mod rawsyn;
pub mod refmodel;
pub mod wrk;
