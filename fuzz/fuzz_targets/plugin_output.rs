//! Every plugin output format over arbitrary output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vogeler_plugin_spec::format::Format;

fuzz_target!(|data: &[u8]| {
    let formats = [
        Format::Lines,
        Format::String,
        Format::Json,
        Format::Yaml,
        Format::Kv,
        Format::Raw,
        Format::Fields {
            names: vec!["name".into(), "version".into(), "arch".into()],
            separator: None,
        },
        Format::Fields {
            names: vec!["name".into(), "version".into()],
            separator: Some("\t".into()),
        },
    ];
    for f in &formats {
        let _ = f.parse(data);
    }
});
