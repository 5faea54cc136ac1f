//! Plugin files and plugin output, parsed without I/O: what a plugin definition may say (the
//! TOML syntax, and the original Vogeler `*.cfg` files through [`legacy`]), its validation,
//! and how a plugin's output becomes JSON ([`format`]). The agent reads the files and runs the
//! programs; everything here is a pure function of text and bytes, so it is unit-tested and
//! fuzzed on its own.
//!
//! A plugin file (one or more plugins each):
//!
//! ```toml
//! name = "hello"
//! description = "Says hello"            # optional
//! command = ["printf", "alpha\nbeta\n"]  # argv, run without a shell
//! format = "lines"                       # lines | string | json | yaml | kv | raw | fields
//! timeout = "60s"                        # optional, default 60s
//! max_output = "4MiB"                    # optional cap on stdout, default 4 MiB, at most 7 MiB
//! user = "nobody"                        # optional: run as this account (agent must be root)
//! env = { TZ = "UTC" }                   # optional extra environment
//! fields = ["name", "version"]           # format "fields" only: one object per line
//! separator = "\t"                       # format "fields" only: default runs of whitespace
//! interval = "1h"                        # optional: the agent also runs it on this schedule
//! splay = "5m"                           # optional: each run a random 0..splay later
//! packages = "rpm"                       # optional: a package inventory in dpkg's or rpm's order
//! ```
//! `packages` says the value is a list of records with `name` and `version` (and optionally
//! `arch`, `status`, `epoch`, `release`) whose versions compare in dpkg's or rpm's order, so
//! the package index and `has` cover it as they cover `dpkg` and `rpms` (package inventories
//! by name, see [`vogeler_proto::version::BY_NAME`]). rpm's order suits any dotted version
//! (it is pacman's own; pip's and apk's come close). It needs a format that makes records:
//! `fields` naming `name` and `version`, or `json` and `yaml`, whose shape is the program's.
//!
//! Original Vogeler `*.cfg` files load too (see [`legacy`]).

pub mod format;
pub mod legacy;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use vogeler_proto::{duration, names::PluginName, version::Scheme};

use crate::format::Format;

/// Used when a plugin file sets no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Used when a plugin file sets no `max_output`.
pub const DEFAULT_MAX_OUTPUT: usize = 4 * 1024 * 1024;
/// The largest `max_output` a plugin may ask for: the largest value a result may carry.
pub const MAX_MAX_OUTPUT: usize = vogeler_proto::limits::MAX_VALUE_BYTES;

/// Every key a plugin file may set, with what it means: the one list the parser accepts (a
/// key missing here is refused before the file is read further), the agent's `--help` and man
/// page print ([`help`]), and a test holds against [`PluginFile`]'s fields.
pub const KEYS: &[(&str, &str)] = &[
    (
        "name",
        "required: the plugin's name, the key its value is stored under",
    ),
    ("description", "optional: what it collects"),
    (
        "command",
        "required: the program and its arguments, run without a shell (a relative path is beside the file)",
    ),
    (
        "format",
        "required: how its output becomes JSON (the formats below)",
    ),
    (
        "timeout",
        "optional, default 60s: killed with its process group after this",
    ),
    (
        "max_output",
        "optional, default 4 MiB, at most 7 MiB: cap on stdout (\"512KiB\", \"4MiB\" or bytes)",
    ),
    (
        "user",
        "optional: run as this account (the agent must run as root)",
    ),
    ("env", "optional: extra environment, e.g. { TZ = \"UTC\" }"),
    (
        "fields",
        "format \"fields\" only: the field names, e.g. [\"name\", \"version\"]",
    ),
    (
        "separator",
        "format \"fields\" only: what splits a line (default: runs of whitespace)",
    ),
    (
        "interval",
        "optional: the agent also runs it on this schedule (1s to 31d)",
    ),
    (
        "splay",
        "optional, needs interval: each scheduled run starts a random 0..splay later",
    ),
    (
        "packages",
        "optional, \"dpkg\" or \"rpm\": the value is a package inventory, a list of records with `name` and `version` (and optionally `arch`, `status`, `epoch`, `release`), compared in dpkg's or rpm's version order (rpm's suits any dotted version); needs format \"fields\" naming name and version, \"json\" or \"yaml\"",
    ),
];

/// The plugin-file reference as `--help` and the man pages print it: every key and every
/// format from [`KEYS`] and [`FORMATS`](format::FORMATS), and the legacy `*.cfg` keys.
pub fn help() -> String {
    fn table(out: &mut String, rows: &[(&str, &str)]) {
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
        for (key, about) in rows {
            let mut line = format!("  {key:<width$}");
            let indent = line.len();
            for word in about.split(' ') {
                if line.len() + 1 + word.len() > HELP_WIDTH && line.len() > indent {
                    out.push_str(line.trim_end());
                    out.push('\n');
                    line = " ".repeat(indent);
                } else if line.len() > indent {
                    line.push(' ');
                }
                line.push_str(word);
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    let mut out = String::from(
        "Plugin files: *.toml in the plugin directory, one plugin each, these keys:\n",
    );
    table(&mut out, KEYS);
    out.push_str("\nFormats (format = \"...\"):\n");
    table(&mut out, format::FORMATS);
    out.push_str("\nOriginal Vogeler *.cfg files load too: [sections] with these keys:\n");
    table(&mut out, legacy::KEYS);
    out
}

/// Where [`help`] wraps, so clap's own wrapping (at 100 columns) leaves it alone.
const HELP_WIDTH: usize = 90;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    command: Vec<String>,
    format: String,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    timeout: Option<Duration>,
    #[serde(default)]
    max_output: Option<ByteSize>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    fields: Option<Vec<String>>,
    #[serde(default)]
    separator: Option<String>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    splay: Option<Duration>,
    #[serde(default)]
    packages: Option<String>,
}

/// A size in bytes: a number, or a string such as `"512KiB"` or `"4MiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(s) => {
                let t = s.trim();
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (num, unit) = t.split_at(split);
                let mult: u64 = match unit.trim() {
                    "" | "B" => 1,
                    "KiB" | "K" | "KB" => 1 << 10,
                    "MiB" | "M" | "MB" => 1 << 20,
                    "GiB" | "G" | "GB" => 1 << 30,
                    other => {
                        return Err(format!(
                            "max_output: unknown unit {other:?} in {s:?}; use bytes, KiB or MiB"
                        ));
                    }
                };
                num.parse::<u64>()
                    .ok()
                    .and_then(|n| n.checked_mul(mult))
                    .ok_or_else(|| format!("max_output: {s:?} is not a size; write e.g. 4MiB"))
            }
        }
    }
}

/// A loaded, valid plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct Plugin {
    pub name: PluginName,
    pub description: Option<String>,
    /// The program: a bare name is looked up on the plugin `PATH`, a relative path resolves
    /// against the plugin file's directory (so a plugin can ship its script beside it).
    pub program: PathBuf,
    pub args: Vec<String>,
    pub format: Format,
    pub timeout: Duration,
    pub max_output: usize,
    /// Run as this account instead of the agent's.
    pub user: Option<String>,
    /// Extra environment on top of the minimal one every plugin gets.
    pub env: BTreeMap<String, String>,
    pub file: PathBuf,
    /// `sha256:<hex>` of the file, announced so the server can see which version runs.
    pub hash: String,
    /// The agent also runs the plugin on this interval (the agent config may override it).
    pub interval: Option<Duration>,
    /// Each scheduled run starts a random time up to this much after it is due, so a fleet
    /// started together does not collect in lockstep.
    pub splay: Option<Duration>,
    /// Declared a package inventory whose versions follow this order; announced, so the
    /// package index and `has` cover it. `None` for `dpkg` and `rpms` unless their files say
    /// it: they are package inventories by name (see [`Plugin::package_order`]).
    pub packages: Option<Scheme>,
}

impl Plugin {
    /// The order readers compare this plugin's versions in: the declared one, or the one
    /// `dpkg` and `rpms` have by name; `None` for a plugin that is no package inventory.
    pub fn package_order(&self) -> Option<Scheme> {
        self.packages
            .or_else(|| Scheme::by_name(self.name.as_str()))
    }
}

/// Everything a plugin definition may say, whichever file syntax it came from.
#[derive(Debug)]
pub struct Definition {
    pub name: String,
    pub description: Option<String>,
    pub command: Vec<String>,
    pub format: Format,
    pub timeout: Option<Duration>,
    pub max_output: Option<u64>,
    pub user: Option<String>,
    pub env: BTreeMap<String, String>,
    pub interval: Option<Duration>,
    pub splay: Option<Duration>,
    pub packages: Option<Scheme>,
}

impl Definition {
    /// Validate and resolve into a [`Plugin`].
    pub fn build(self, file: &Path, hash: &str) -> Result<Plugin, String> {
        let name = PluginName::new(self.name).map_err(|e| e.to_string())?;
        let mut command = self.command.into_iter();
        let program = command
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("command is empty: give the program and its arguments")?;
        let program = PathBuf::from(program);
        let program = if program.is_relative() && program.components().count() > 1 {
            // Absolute, because plugins run with `/` as their working directory.
            let dir = file.parent().unwrap_or(Path::new("."));
            std::path::absolute(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .join(program)
        } else {
            program
        };
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err("timeout must be longer than zero".into());
        }
        let max_output = match self.max_output {
            None => DEFAULT_MAX_OUTPUT,
            Some(0) => return Err("max_output must be at least 1 byte".into()),
            Some(n) if n > MAX_MAX_OUTPUT as u64 => {
                return Err(format!(
                    "max_output {n} is over the {} MiB limit of one result",
                    MAX_MAX_OUTPUT >> 20
                ));
            }
            Some(n) => usize::try_from(n).unwrap_or(MAX_MAX_OUTPUT),
        };
        if let Some(bad) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(format!("env: {bad:?} is not a valid variable name"));
        }
        if let Some(i) = self.interval {
            vogeler_proto::limits::check_interval(i)?;
        }
        match (self.interval, self.splay) {
            (None, Some(_)) => {
                return Err("splay without an interval: set interval too, or remove splay".into());
            }
            (Some(i), Some(s)) if s > i => {
                return Err(format!(
                    "splay {} is longer than the interval {}: runs would overtake each other; use a splay up to the interval",
                    duration::format(s),
                    duration::format(i)
                ));
            }
            _ => {}
        }
        if self.user.as_deref() == Some("") {
            return Err("user must not be empty; leave it out to run as the agent's user".into());
        }
        if let Some(scheme) = self.packages {
            check_packages(&name, &self.format, scheme)?;
        }
        Ok(Plugin {
            name,
            description: self.description,
            program,
            args: command.collect(),
            format: self.format,
            timeout,
            max_output,
            user: self.user,
            env: self.env,
            file: file.to_path_buf(),
            hash: hash.to_string(),
            interval: self.interval,
            splay: self.splay,
            packages: self.packages,
        })
    }
}

/// Whether a plugin may declare itself a package inventory in `scheme`'s order.
fn check_packages(name: &PluginName, format: &Format, scheme: Scheme) -> Result<(), String> {
    // Readers that go by the name would compare its versions in the other order than `has`.
    if let Some(by_name) = Scheme::by_name(name.as_str())
        && by_name != scheme
    {
        return Err(format!(
            "packages = \"{scheme}\" contradicts the name: plugin {name} is a package inventory in {by_name}'s order by its name alone; remove packages, or rename the plugin"
        ));
    }
    match format {
        Format::Fields { names, .. } => {
            let missing: Vec<String> = ["name", "version"]
                .into_iter()
                .filter(|k| !names.iter().any(|n| n == k))
                .map(|k| format!("\"{k}\""))
                .collect();
            if !missing.is_empty() {
                let them = if missing.len() == 1 { "it" } else { "them" };
                return Err(format!(
                    "packages needs records with a name and a version, and fields lacks {}; add {them} to fields, or remove packages",
                    missing.join(" and ")
                ));
            }
        }
        // Records are possible; whether the program prints a list of them is its own affair,
        // as with any structured plugin.
        Format::Json | Format::Yaml => {}
        Format::Lines | Format::String | Format::Kv | Format::Raw => {
            return Err(format!(
                "packages needs a list of records with name and version, which format {:?} does not make; use format \"fields\" with \"name\" and \"version\" among its fields, \"json\" or \"yaml\", or remove packages",
                format.name()
            ));
        }
    }
    Ok(())
}

/// Parse a plugin file's text (the agent's `load_file` reads it); `path` (its extension: `.cfg` is the
/// legacy format) is used in messages and to resolve the program.
pub fn parse_text(text: &str, path: &Path, hash: &str) -> Vec<Result<Plugin, String>> {
    if path.extension().is_some_and(|e| e == "cfg") {
        return legacy::definitions(text)
            .into_iter()
            .map(|d| d.and_then(|d| d.build(path, hash)))
            .collect();
    }
    vec![toml_definition(text).and_then(|d| d.build(path, hash))]
}

fn toml_definition(text: &str) -> Result<Definition, String> {
    let error = |e: toml::de::Error| e.message().to_string() + &location(text, e.span());
    let table = toml::de::DeTable::parse(text).map_err(error)?;
    if let Some(key) = table
        .get_ref()
        .keys()
        .find(|k| !KEYS.iter().any(|(name, _)| *name == k.get_ref().as_ref()))
    {
        return Err(format!(
            "unknown key {:?}{}; a plugin file may set {}",
            key.get_ref().as_ref(),
            location(text, Some(key.span())),
            KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        ));
    }
    let raw = PluginFile::deserialize(toml::de::Deserializer::from(table)).map_err(error)?;
    Ok(Definition {
        format: Format::from_parts(&raw.format, raw.fields, raw.separator)?,
        max_output: raw.max_output.as_ref().map(ByteSize::bytes).transpose()?,
        name: raw.name,
        description: raw.description,
        command: raw.command,
        timeout: raw.timeout,
        user: raw.user,
        env: raw.env,
        interval: raw.interval,
        splay: raw.splay,
        packages: raw
            .packages
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| format!("packages: {e}"))?,
    })
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(rows: &[(&'static str, &'static str)]) -> Vec<&'static str> {
        rows.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn keys_are_the_plugin_files_fields() {
        let fields = serde_aux::serde_introspection::serde_introspect::<PluginFile>();
        assert_eq!(
            names(KEYS),
            fields,
            "KEYS and PluginFile's fields, in order"
        );
        for (key, about) in KEYS {
            assert!(
                !about.is_empty() && !about.contains('\n'),
                "{key}: one line"
            );
        }
        let about = |k: &str| KEYS.iter().find(|(n, _)| *n == k).map_or("", |(_, a)| a);
        assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(60));
        assert!(about("timeout").contains("default 60s"));
        let sizes = format!(
            "default {} MiB, at most {} MiB",
            DEFAULT_MAX_OUTPUT >> 20,
            MAX_MAX_OUTPUT >> 20
        );
        assert!(about("max_output").contains(&sizes), "{sizes}");
        assert_eq!(vogeler_proto::limits::MAX_INTERVAL_S, 31 * 24 * 3600);
        assert!(about("interval").contains("1s to 31d"));
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_line_and_the_keys_there_are() {
        let text = "name = \"x\"\ncommand = [\"id\"]\nformat = \"raw\"\ncomand = [\"id\"]\n";
        let err = toml_definition(text).expect_err("typo");
        assert!(
            err.starts_with(
                "unknown key \"comand\" (line 4); a plugin file may set name, description, command,"
            ),
            "{err}"
        );
        let err =
            toml_definition("name = 3\ncommand = [\"id\"]\nformat = \"raw\"\n").expect_err("type");
        assert!(
            err.contains("(line 1)"),
            "spans survive the key check: {err}"
        );
        let ok = toml_definition(
            "name = \"x\"\ncommand = [\"id\"]\nformat = \"lines\"\ninterval = \"1h\"\n",
        );
        assert!(ok.is_ok_and(|d| d.interval == Some(Duration::from_secs(3600))));
    }

    fn plugin(text: &str) -> Result<Plugin, String> {
        let mut all = parse_text(text, Path::new("/etc/vogeler/plugins.d/p.toml"), "sha256:1");
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    #[test]
    fn a_plugin_may_declare_itself_a_package_inventory() {
        let pip = "name = \"pip\"\ncommand = [\"python3\", \"-m\", \"pip\", \"list\", \"--format\", \"json\"]\nformat = \"json\"\npackages = \"rpm\"\n";
        let p = plugin(pip).expect("pip");
        assert_eq!(
            (p.packages, p.package_order()),
            (Some(Scheme::Rpm), Some(Scheme::Rpm))
        );
        let pacman = "name = \"pacman\"\ncommand = [\"pacman\", \"--query\"]\nformat = \"fields\"\nfields = [\"name\", \"version\"]\npackages = \"rpm\"\n";
        assert_eq!(plugin(pacman).expect("pacman").packages, Some(Scheme::Rpm));
        let yaml = "name = \"y\"\ncommand = [\"x\"]\nformat = \"yaml\"\npackages = \"dpkg\"\n";
        assert_eq!(plugin(yaml).expect("yaml").packages, Some(Scheme::Dpkg));
        // dpkg and rpms are package inventories by name, with or without saying so.
        let dpkg = "name = \"dpkg\"\ncommand = [\"dpkg-query\", \"-W\"]\nformat = \"fields\"\nfields = [\"name\", \"version\"]\n";
        let p = plugin(dpkg).expect("dpkg");
        assert_eq!((p.packages, p.package_order()), (None, Some(Scheme::Dpkg)));
        let p = plugin(&format!("{dpkg}packages = \"dpkg\"\n")).expect("dpkg declared");
        assert_eq!(p.packages, Some(Scheme::Dpkg));
        let hello = "name = \"hello\"\ncommand = [\"id\"]\nformat = \"lines\"\n";
        assert_eq!(plugin(hello).expect("hello").package_order(), None);
    }

    #[test]
    fn a_package_declaration_that_cannot_hold_is_refused() {
        let base = "command = [\"x\"]\n";
        for (text, want) in [
            (
                "name = \"p\"\nformat = \"json\"\npackages = \"apk\"\n",
                "packages: unknown version order \"apk\"; use \"dpkg\" or \"rpm\"",
            ),
            (
                "name = \"p\"\nformat = \"json\"\npackages = 1\n",
                "invalid type",
            ),
            (
                "name = \"p\"\nformat = \"lines\"\npackages = \"rpm\"\n",
                "format \"lines\" does not make",
            ),
            (
                "name = \"p\"\nformat = \"kv\"\npackages = \"rpm\"\n",
                "format \"kv\" does not make",
            ),
            (
                "name = \"p\"\nformat = \"fields\"\nfields = [\"name\", \"ver\"]\npackages = \"rpm\"\n",
                "fields lacks \"version\"; add it to fields",
            ),
            (
                "name = \"p\"\nformat = \"fields\"\nfields = [\"pkg\", \"ver\"]\npackages = \"rpm\"\n",
                "fields lacks \"name\" and \"version\"; add them",
            ),
            (
                "name = \"dpkg\"\nformat = \"json\"\npackages = \"rpm\"\n",
                "packages = \"rpm\" contradicts the name: plugin dpkg is a package inventory in dpkg's order",
            ),
            (
                "name = \"rpms\"\nformat = \"json\"\npackages = \"dpkg\"\n",
                "plugin rpms is a package inventory in rpm's order by its name alone",
            ),
        ] {
            let err = plugin(&format!("{base}{text}")).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn help_lists_every_key_and_format() {
        let help = help();
        for (key, about) in KEYS.iter().chain(format::FORMATS).chain(legacy::KEYS) {
            let first_words: String = about.split(' ').take(3).collect::<Vec<_>>().join(" ");
            assert!(
                help.lines()
                    .any(|l| l.starts_with(&format!("  {key} ")) && l.contains(&first_words)),
                "{key} missing from:\n{help}"
            );
        }
        assert!(help.lines().all(|l| l.len() <= HELP_WIDTH), "{help}");
    }
}
