//! Command verification and decoding, as an agent does it: the bytes are signed by a
//! trusted key (so the fuzzer reaches the parser), then checked by the real guard.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vogeler_proto::{
    guard::{Guard, Provenance},
    names::NodeName,
    signing::{AuthorizedKeys, PrivateKey, Purpose},
    wire,
};

fn setup() -> &'static (Guard, PrivateKey) {
    static S: OnceLock<(Guard, PrivateKey)> = OnceLock::new();
    S.get_or_init(|| {
        let key = PrivateKey::generate().expect("key");
        let keys = AuthorizedKeys::parse(
            &format!("plugins=p* nodes=web* {}", key.public().to_line("fuzz")),
            "fuzz",
        )
        .expect("keys");
        let guard = Guard {
            node: NodeName::new("web01").expect("node"),
            keys,
            max_clock_skew: std::time::Duration::from_secs(60),
            max_ttl: std::time::Duration::from_secs(3600),
        };
        (guard, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let (guard, key) = setup();
    let (k, s) = key.sign(Purpose::Command, data);
    let now = chrono::Utc::now();
    let _ = guard.check(data, Some(&k), Some(&s), now, &mut Provenance::default());
    // Unsigned and badly signed paths too.
    let _ = guard.check(data, None, None, now, &mut Provenance::default());
    let _ = guard.check(data, Some(&k), Some("AAAA"), now, &mut Provenance::default());
    let _ = wire::decode_command(data);
});
