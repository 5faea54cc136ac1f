//! Plugin output formats: how a plugin's stdout becomes the JSON value stored for the node.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How to read a plugin's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A list of the non-empty lines, trailing whitespace removed.
    Lines,
    /// The whole output as one string, trimmed.
    String,
    /// A JSON document.
    Json,
    /// `key=value` or `key: value` lines into an object (blank lines and `#` comments skipped).
    Kv,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Lines => "lines",
            Format::String => "string",
            Format::Json => "json",
            Format::Kv => "kv",
        }
    }

    /// Parse `output`. The error says where parsing failed.
    pub fn parse(self, output: &[u8]) -> Result<Value, String> {
        match self {
            Format::Json => serde_json::from_slice(output).map_err(|e| e.to_string()),
            Format::Lines => Ok(Value::Array(
                text(output)?
                    .lines()
                    .map(str::trim_end)
                    .filter(|l| !l.is_empty())
                    .map(|l| Value::String(l.to_string()))
                    .collect(),
            )),
            Format::String => Ok(Value::String(text(output)?.trim().to_string())),
            Format::Kv => {
                let mut map = Map::new();
                for (i, line) in text(output)?.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let Some(at) = line.find(['=', ':']) else {
                        return Err(format!(
                            "line {}: no '=' or ':' in {:?}",
                            i + 1,
                            truncate(line)
                        ));
                    };
                    let key = line[..at].trim();
                    if key.is_empty() {
                        return Err(format!("line {}: empty key", i + 1));
                    }
                    map.insert(
                        key.to_string(),
                        Value::String(line[at + 1..].trim().to_string()),
                    );
                }
                Ok(Value::Object(map))
            }
        }
    }
}

fn text(output: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(output).map_err(|e| format!("not UTF-8 at byte {}", e.valid_up_to()))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines() {
        assert_eq!(
            Format::Lines.parse(b"alpha\n\nbeta  \n"),
            Ok(json!(["alpha", "beta"]))
        );
        assert_eq!(Format::Lines.parse(b""), Ok(json!([])));
        assert!(
            Format::Lines
                .parse(b"ok\n\xff\n")
                .unwrap_err()
                .contains("byte 3")
        );
    }

    #[test]
    fn string_and_json() {
        assert_eq!(Format::String.parse(b"  hi there\n"), Ok(json!("hi there")));
        assert_eq!(
            Format::Json.parse(b"{\"a\": [1, 2]}"),
            Ok(json!({"a": [1, 2]}))
        );
        let err = Format::Json.parse(b"{\"a\": \n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(Format::Json.parse(b"").is_err());
    }

    #[test]
    fn kv() {
        let out = b"# os-release\nID=debian\nVERSION_ID=\"12\"\nname: web01\n\n";
        assert_eq!(
            Format::Kv.parse(out),
            Ok(json!({"ID": "debian", "VERSION_ID": "\"12\"", "name": "web01"}))
        );
        assert!(
            Format::Kv
                .parse(b"a=1\nnonsense\n")
                .unwrap_err()
                .contains("line 2")
        );
        assert!(Format::Kv.parse(b"=1\n").unwrap_err().contains("empty key"));
    }
}
