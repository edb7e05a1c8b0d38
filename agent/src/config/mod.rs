//! Configuration: YAML in, validated [`model::Config`] or located errors out.

pub mod model;

pub use model::*;
