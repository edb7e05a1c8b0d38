//! Helpers for keyfence's privileged tests: packet frames, the datapath's
//! reference model, network-namespace hosts, config fragments and HTTP peers,
//! and wrk for the benches. The demo (`src/bin/kf-demo.rs`) uses them too.

pub mod bench;
pub mod config;
pub mod frames;
pub mod h2;
pub mod http;
pub mod loaded;
pub mod netns;
pub mod postgres;
pub mod rawsyn;
pub mod refmodel;
pub mod tls;
pub mod webdriver;
pub mod wrk;
