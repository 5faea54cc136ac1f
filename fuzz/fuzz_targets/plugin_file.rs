//! Plugin files: TOML and the legacy .cfg format.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vogeler_plugin_spec as plugin;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = plugin::parse_text(text, Path::new("/etc/vogeler/plugins.d/fuzz.toml"), "sha256:0");
    let _ = plugin::parse_text(text, Path::new("/etc/vogeler/plugins.d/fuzz.cfg"), "sha256:0");
});
