//! Configuration: YAML in, validated [`model::Config`] or located errors out.

mod load;
pub mod model;

pub use load::{ConfigError, ConfigErrors, load, parse};
pub use model::*;
