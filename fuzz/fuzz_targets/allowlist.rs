//! Fuzz the allow-list grammar: no input may panic, and whatever parses must
//! print to a canonical text that parses back to the same list.
//! Run: `cargo +nightly fuzz run allowlist` from this directory.
#![no_main]

use keyfence::allowlist::{DEFAULT_MAX_ENTRIES, RawList, parse_list, to_canonical_string};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(list) = parse_list(&RawList::One(text.to_owned()), DEFAULT_MAX_ENTRIES) {
        let canonical = to_canonical_string(&list);
        let again = parse_list(&RawList::One(canonical), DEFAULT_MAX_ENTRIES)
            .expect("canonical text parses");
        assert_eq!(list.entries().len(), again.entries().len());
        for (a, b) in list.entries().iter().zip(again.entries()) {
            assert_eq!(a.net, b.net);
        }
    }
});
