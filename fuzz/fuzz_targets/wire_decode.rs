//! Decoding of any message (what the server and runner do with results and announcements),
//! and re-encoding of whatever decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vogeler_proto::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = wire::decode(data) {
        let again = wire::decode(&wire::encode(&m)).expect("a decoded message re-decodes");
        assert_eq!(again, m);
    }
});
