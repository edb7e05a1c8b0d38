//! Configuration: YAML in, validated [`model::Config`] or located errors out.

mod load;
pub mod model;
mod shape;

pub use load::{ConfigError, ConfigErrors, Secrets, load, load_with, parse, parse_with};
pub use model::*;
