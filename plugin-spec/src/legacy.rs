//! The original Vogeler plugin files (`*.cfg`), so existing plugins drop in unchanged:
//!
//! ```ini
//! [rpm]
//! name = rpm
//! description = Grabs packages installed on a system using rpm
//! command = rpm -qa
//! result_format = output
//! command_alias = get_rpms
//! ```
//! Any section name, several sections per file. `command` is split by shell-word rules but
//! still run without a shell; `result_format` `output` means `lines`; `command_alias` is
//! accepted and ignored.

use std::collections::BTreeMap;

use ini::{Ini, ParseOption};

use crate::Definition;
use crate::format::Format;

/// Every key a legacy section may set: the list the parser accepts and `--help` prints.
pub const KEYS: &[(&str, &str)] = &[
    ("name", "the plugin's name"),
    ("description", "what it collects"),
    (
        "command",
        "split by shell-word rules, still run without a shell",
    ),
    (
        "result_format",
        "output (= lines), json, yaml, string or raw",
    ),
    ("command_alias", "accepted and ignored"),
];

/// `result_format` values and the format each means.
const RESULT_FORMATS: &[(&str, &str)] = &[
    ("output", "lines"),
    ("json", "json"),
    ("yaml", "yaml"),
    ("string", "string"),
    ("raw", "raw"),
];

/// Every definition in a legacy file, each valid or with its problem.
pub(crate) fn definitions(text: &str) -> Vec<Result<Definition, String>> {
    let opts = ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    let ini = match Ini::load_from_str_opt(text, opts) {
        Ok(i) => i,
        Err(e) => return vec![Err(format!("not a valid .cfg file: {e}"))],
    };
    let mut out = vec![];
    for (section, props) in ini.iter() {
        let Some(section) = section else {
            if props.iter().next().is_some() {
                out.push(Err(
                    "keys outside a [section]; put each plugin under a [name] header".into(),
                ));
            }
            continue;
        };
        out.push(definition(section, props.iter()).map_err(|e| format!("[{section}]: {e}")));
    }
    if out.is_empty() {
        out.push(Err("no [section] with a plugin definition".into()));
    }
    out
}

fn definition<'a>(
    section: &str,
    props: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<Definition, String> {
    let mut keys = BTreeMap::new();
    for (k, v) in props {
        if !KEYS.iter().any(|(name, _)| *name == k) {
            return Err(format!(
                "unknown key {k:?}; expected one of {}",
                KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            ));
        }
        keys.insert(k, v.trim());
    }
    let need = |k: &str| {
        keys.get(k)
            .copied()
            .ok_or_else(|| format!("missing key {k:?} in section [{section}]"))
    };
    let name = need("name")?;
    let command = need("command")?;
    let argv = shlex::split(command)
        .ok_or_else(|| format!("command {command:?} has unbalanced quotes"))?;
    let result_format = need("result_format")?;
    let format = match RESULT_FORMATS
        .iter()
        .find(|(name, _)| *name == result_format)
    {
        Some((_, format)) => Format::from_parts(format, None, None)?,
        None => {
            return Err(format!(
                "result_format {result_format:?} is not one of {}",
                RESULT_FORMATS
                    .iter()
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    };
    Ok(Definition {
        name: name.to_string(),
        description: keys.get("description").map(|s| s.to_string()),
        command: argv,
        format,
        timeout: None,
        max_output: None,
        user: None,
        env: BTreeMap::new(),
        // Legacy plugins run only on command; `[agent.schedule]` can give them an interval.
        interval: None,
        splay: None,
        // The original syntax has no such key, and its formats (`output` is a list of lines)
        // seldom make records: a package inventory is written as a TOML file.
        packages: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_formats_are_listed_and_parse() {
        let about = KEYS
            .iter()
            .find(|(k, _)| *k == "result_format")
            .map_or("", |(_, a)| a);
        for (name, format) in RESULT_FORMATS {
            assert!(about.contains(name), "{name} missing from {about:?}");
            assert!(Format::from_parts(format, None, None).is_ok(), "{format}");
        }
    }
}
