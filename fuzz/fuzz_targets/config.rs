//! Config files: parse as TOML into the raw config, then validate for every program.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vogeler_config::RawConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = toml::from_str::<RawConfig>(text) {
        let _ = raw.agent(Some("fuzz01".into()));
        let _ = raw.server();
        let _ = raw.runner();
    }
});
