//! Fuzz the PROXY protocol v1/v2 parser the shim runs on the first bytes of a
//! connection from a trusted peer. No input may panic, and because the shim
//! parses again as more bytes arrive, every prefix of an input must either ask
//! for more bytes or give exactly the answer the whole input gives: a header
//! must never be accepted (or refused) differently depending on how TCP split it.
//! Run: `cargo +nightly fuzz run proxy_header` from this directory.
#![no_main]

use keyfence::shim::client_ip::{
    PROXY_V1_MAX, PROXY_V2_MAX, ProxyParse, parse_proxy_header,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse_proxy_header(data);
    if let Ok(ProxyParse::Done { len, source }) = &whole {
        assert!(*len <= data.len(), "header of {len} bytes in {} bytes", data.len());
        assert!(*len <= PROXY_V1_MAX.max(PROXY_V2_MAX), "header of {len} bytes");
        // What follows the header is the client's: it cannot change the header.
        let exact = parse_proxy_header(&data[..*len]);
        assert_eq!(
            exact,
            Ok(ProxyParse::Done { len: *len, source: *source }),
            "the header alone parses differently"
        );
    }
    // The shim reads at most the larger header's length before it decides.
    let bound = data.len().min(PROXY_V2_MAX + 1);
    for cut in 0..bound {
        let part = parse_proxy_header(&data[..cut]);
        if part != Ok(ProxyParse::Incomplete) {
            assert_eq!(part, whole, "the first {cut} bytes decide differently");
        }
    }
});
