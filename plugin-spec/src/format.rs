//! Plugin output formats: how a plugin's stdout becomes the JSON value stored for the node.
//! Parsing happens on the agent, so the wire and the database only ever see JSON; a parse
//! failure is an `invalid_output` result naming the format and the place it failed.

use base64::Engine as _;
use serde_json::{Map, Value};

/// How to read a plugin's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// A list of the non-empty lines, trailing whitespace removed.
    Lines,
    /// The whole output as one string, trimmed.
    String,
    /// A JSON document.
    Json,
    /// A YAML document (plain data only: no language-specific tags are executed).
    Yaml,
    /// `key=value` or `key: value` lines into an object (blank lines and `#` comments skipped,
    /// one pair of surrounding quotes removed from values).
    Kv,
    /// The bytes exactly: a string when UTF-8, else `{"base64": "..."}`.
    Raw,
    /// One object per non-empty line: the line split into the named fields, on `separator`
    /// (or runs of whitespace when none), the last field taking the rest of the line.
    /// Missing trailing fields are `null`.
    Fields {
        names: Vec<String>,
        separator: Option<String>,
    },
}

/// Every format a plugin file may name, with what it makes of the output: the one list the
/// parser accepts ([`Format::from_parts`] refuses a name missing here), the agent's `--help`
/// and man page print, and the tests hold against the variants.
pub const FORMATS: &[(&str, &str)] = &[
    (
        "lines",
        "a list of the non-empty lines, trailing whitespace removed",
    ),
    ("string", "the whole output as one string, trimmed"),
    ("json", "the JSON document"),
    (
        "yaml",
        "the YAML document (plain data: tags execute nothing, alias bombs are refused)",
    ),
    (
        "kv",
        "`key=value` or `key: value` lines as an object (`#` comments skipped, one pair of quotes removed)",
    ),
    (
        "raw",
        "the bytes exactly: a string when UTF-8, else {\"base64\": \"...\"}",
    ),
    (
        "fields",
        "one object per non-empty line, split into the named `fields` on `separator` (default: runs of whitespace), the last taking the rest of the line",
    ),
];

/// The names in [`FORMATS`].
pub fn names() -> impl Iterator<Item = &'static str> {
    FORMATS.iter().map(|(name, _)| *name)
}

impl Format {
    /// Build a format from a plugin file's `format` (and, for `fields`, its field list).
    pub fn from_parts(
        name: &str,
        fields: Option<Vec<String>>,
        separator: Option<String>,
    ) -> Result<Self, String> {
        if !names().any(|n| n == name) {
            return Err(format!(
                "unknown format {name:?}; use one of {}",
                names().collect::<Vec<_>>().join(", ")
            ));
        }
        let simple = match name {
            "lines" => Format::Lines,
            "string" => Format::String,
            "json" => Format::Json,
            "yaml" => Format::Yaml,
            "kv" => Format::Kv,
            "raw" => Format::Raw,
            "fields" => {
                let names = fields.filter(|f| !f.is_empty()).ok_or(
                    "format \"fields\" needs `fields`, e.g. fields = [\"name\", \"version\"]",
                )?;
                if separator.as_deref() == Some("") {
                    return Err("separator must not be empty".into());
                }
                return Ok(Format::Fields { names, separator });
            }
            // A name in FORMATS without an arm here: the tests catch it.
            other => return Err(format!("format {other:?} is listed but not implemented")),
        };
        if fields.is_some() || separator.is_some() {
            return Err(format!(
                "`fields` and `separator` only apply to format \"fields\", not {name:?}"
            ));
        }
        Ok(simple)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Format::Lines => "lines",
            Format::String => "string",
            Format::Json => "json",
            Format::Yaml => "yaml",
            Format::Kv => "kv",
            Format::Raw => "raw",
            Format::Fields { .. } => "fields",
        }
    }

    /// Parse `output`. The error says where parsing failed.
    pub fn parse(&self, output: &[u8]) -> Result<Value, String> {
        match self {
            Format::Json => serde_json::from_slice(output).map_err(|e| e.to_string()),
            Format::Yaml => {
                if output.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Value::Null);
                }
                serde_yaml_ng::from_slice(output).map_err(|e| e.to_string())
            }
            Format::Lines => Ok(Value::Array(
                lines(output)?
                    .map(|(_, l)| Value::String(l.to_string()))
                    .collect(),
            )),
            Format::String => Ok(Value::String(text(output)?.trim().to_string())),
            Format::Raw => Ok(match std::str::from_utf8(output) {
                Ok(s) => Value::String(s.to_string()),
                Err(_) => {
                    let mut m = Map::new();
                    m.insert(
                        "base64".into(),
                        Value::String(base64::engine::general_purpose::STANDARD.encode(output)),
                    );
                    Value::Object(m)
                }
            }),
            Format::Kv => {
                let mut map = Map::new();
                for (n, line) in lines(output)? {
                    let line = line.trim();
                    if line.starts_with('#') {
                        continue;
                    }
                    let Some(at) = line.find(['=', ':']) else {
                        return Err(format!("line {n}: no '=' or ':' in {:?}", truncate(line)));
                    };
                    let key = line[..at].trim();
                    if key.is_empty() {
                        return Err(format!("line {n}: empty key"));
                    }
                    map.insert(
                        key.to_string(),
                        Value::String(unquote(line[at + 1..].trim()).to_string()),
                    );
                }
                Ok(Value::Object(map))
            }
            Format::Fields { names, separator } => {
                let mut rows = vec![];
                for line in text(output)?.lines() {
                    // With an explicit separator, trailing empty fields are data: only the
                    // line ending is removed.
                    let line = match separator {
                        Some(_) => line.strip_suffix('\r').unwrap_or(line),
                        None => line.trim_end(),
                    };
                    if line.is_empty() {
                        continue;
                    }
                    let parts: Vec<&str> = match separator {
                        Some(sep) => line.splitn(names.len(), sep.as_str()).collect(),
                        None => split_whitespace_n(line, names.len()),
                    };
                    let obj: Map<String, Value> = names
                        .iter()
                        .enumerate()
                        .map(|(i, name)| {
                            (
                                name.clone(),
                                parts
                                    .get(i)
                                    .map_or(Value::Null, |p| Value::String(p.to_string())),
                            )
                        })
                        .collect();
                    rows.push(Value::Object(obj));
                }
                Ok(Value::Array(rows))
            }
        }
    }
}

/// Remove one pair of matching surrounding quotes, as in shell-style files like os-release.
fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// Non-empty lines with their 1-based numbers, trailing whitespace removed.
fn lines(output: &[u8]) -> Result<impl Iterator<Item = (usize, &str)>, String> {
    Ok(text(output)?
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end()))
        .filter(|(_, l)| !l.is_empty()))
}

/// Split on runs of whitespace into at most `n` parts; the last keeps the rest of the line.
fn split_whitespace_n(line: &str, n: usize) -> Vec<&str> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        if parts.len() + 1 == n {
            parts.push(rest);
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        parts.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    parts
}

fn text(output: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(output).map_err(|e| {
        format!(
            "not UTF-8 at byte {} (use format \"raw\" for binary output)",
            e.valid_up_to()
        )
    })
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

    fn f(name: &str) -> Format {
        Format::from_parts(name, None, None).expect("format")
    }

    /// The variant after `f`, from none to the last: the match is exhaustive, so a new
    /// variant does not compile until it is in this chain (and so in the tests below).
    fn next(f: Option<&Format>) -> Option<Format> {
        match f {
            None => Some(Format::Lines),
            Some(Format::Lines) => Some(Format::String),
            Some(Format::String) => Some(Format::Json),
            Some(Format::Json) => Some(Format::Yaml),
            Some(Format::Yaml) => Some(Format::Kv),
            Some(Format::Kv) => Some(Format::Raw),
            Some(Format::Raw) => Some(Format::Fields {
                names: vec!["name".into()],
                separator: None,
            }),
            Some(Format::Fields { .. }) => None,
        }
    }

    fn every_variant() -> Vec<Format> {
        std::iter::successors(next(None), |f| next(Some(f))).collect()
    }

    #[test]
    fn every_variant_is_in_the_table_and_every_name_in_the_table_parses() {
        let variants: Vec<&str> = every_variant().iter().map(Format::name).collect();
        assert_eq!(
            variants,
            names().collect::<Vec<_>>(),
            "variants and FORMATS, in order"
        );
        for (name, about) in FORMATS {
            let fields = (*name == "fields").then(|| vec!["name".to_string()]);
            let parsed = Format::from_parts(name, fields, None).expect("a listed name parses");
            assert_eq!(parsed.name(), *name);
            assert!(
                !about.is_empty() && !about.contains('\n'),
                "{name}: one line"
            );
        }
    }

    #[test]
    fn lines() {
        assert_eq!(
            f("lines").parse(b"alpha\n\nbeta  \n"),
            Ok(json!(["alpha", "beta"]))
        );
        assert_eq!(f("lines").parse(b""), Ok(json!([])));
        assert_eq!(f("lines").parse(b"a\r\nb\r\n"), Ok(json!(["a", "b"])));
        assert!(
            f("lines")
                .parse(b"ok\n\xff\n")
                .unwrap_err()
                .contains("byte 3")
        );
    }

    #[test]
    fn string_and_json() {
        assert_eq!(f("string").parse(b"  hi there\n"), Ok(json!("hi there")));
        assert_eq!(f("string").parse(b""), Ok(json!("")));
        assert!(f("string").parse(b"\xc3\x28").is_err());
        assert_eq!(
            f("json").parse(b"{\"a\": [1, 2]}"),
            Ok(json!({"a": [1, 2]}))
        );
        let err = f("json").parse(b"{\"a\": \n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(f("json").parse(b"").is_err());
        assert!(f("json").parse(b"\xff").is_err());
    }

    #[test]
    fn yaml() {
        assert_eq!(
            f("yaml").parse(b"os:\n  family: Debian\ncpus: 2\n"),
            Ok(json!({"os": {"family": "Debian"}, "cpus": 2}))
        );
        assert_eq!(f("yaml").parse(b"\n"), Ok(Value::Null));
        let err = f("yaml").parse(b"a: [1, 2\n").unwrap_err();
        assert!(err.contains("line"), "{err}");
        // Tags are data, never code: a Python object tag does not construct anything.
        let tagged = f("yaml").parse(b"x: !!python/object/apply:os.system ['id']\n");
        assert!(tagged.is_err() || !tagged.expect("value").to_string().contains("uid="));
        // Alias bombs are refused rather than expanded without bound.
        let bomb = b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n";
        assert!(f("yaml").parse(bomb).is_err());
        assert!(f("yaml").parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn kv() {
        let out = b"# os-release\nID=debian\nVERSION_ID=\"12\"\nname: web01\n\n";
        assert_eq!(
            f("kv").parse(out),
            Ok(json!({"ID": "debian", "VERSION_ID": "12", "name": "web01"}))
        );
        assert!(
            f("kv")
                .parse(b"a=1\nnonsense\n")
                .unwrap_err()
                .contains("line 2")
        );
        assert!(f("kv").parse(b"=1\n").unwrap_err().contains("empty key"));
        assert_eq!(f("kv").parse(b""), Ok(json!({})));
    }

    #[test]
    fn raw_keeps_bytes() {
        assert_eq!(f("raw").parse(b" keep\tall \n"), Ok(json!(" keep\tall \n")));
        assert_eq!(
            f("raw").parse(b"\xff\x00\x01"),
            Ok(json!({"base64": "/wAB"}))
        );
        assert_eq!(f("raw").parse(b""), Ok(json!("")));
    }

    #[test]
    fn fields() {
        let ws = Format::from_parts(
            "fields",
            Some(vec!["name".into(), "size".into(), "rest".into()]),
            None,
        )
        .expect("fields");
        assert_eq!(
            ws.parse(b"ext4  1024   used by  foo\nxfs 2\n"),
            Ok(
                json!([{"name": "ext4", "size": "1024", "rest": "used by  foo"}, {"name": "xfs", "size": "2", "rest": null}])
            )
        );
        let tab = Format::from_parts(
            "fields",
            Some(vec!["name".into(), "version".into(), "arch".into()]),
            Some("\t".into()),
        )
        .expect("fields");
        assert_eq!(
            tab.parse(b"bash\t5.2\t\nzsh\t5.9\tamd64\n"),
            Ok(
                json!([{"name": "bash", "version": "5.2", "arch": ""}, {"name": "zsh", "version": "5.9", "arch": "amd64"}])
            )
        );
        assert!(
            Format::from_parts("fields", None, None)
                .unwrap_err()
                .contains("needs `fields`")
        );
        assert!(Format::from_parts("lines", Some(vec!["a".into()]), None).is_err());
        assert!(
            Format::from_parts("xml", None, None)
                .unwrap_err()
                .contains("unknown format")
        );
    }
}
