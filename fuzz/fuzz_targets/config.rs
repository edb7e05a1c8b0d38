//! Fuzz the config loader (`keyfence check` and every reload run it on a file
//! an operator wrote): no input may panic, an invalid file always says at
//! least one located reason, and loading is a function of the text (the same
//! text gives the same answer, so a reload of an unchanged file changes nothing).
//! Run: `cargo +nightly fuzz run config` from this directory; the dictionary
//! `config.dict` holds the config's field names and values.
#![no_main]

use keyfence::config::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = parse(text, "fuzz.yaml");
    match &first {
        Ok(_) => {}
        Err(errors) => {
            assert!(!errors.0.is_empty(), "refused without a reason");
            for e in &errors.0 {
                assert_eq!(e.file, "fuzz.yaml");
                assert!(!e.message.is_empty(), "an error without a message: {e:?}");
            }
        }
    }
    let second = parse(text, "fuzz.yaml");
    assert_eq!(
        format!("{first:?}"),
        format!("{second:?}"),
        "the same text loaded differently"
    );
});
