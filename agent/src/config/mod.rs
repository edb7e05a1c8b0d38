//! Configuration: YAML in, validated [`model::Config`] or located errors out.

mod load;
pub mod model;

pub use load::{
    ConfigError, ConfigErrors, EntryProblem, RawEntry, RawList, load, parse, parse_entry,
    parse_list,
};
pub use model::*;
