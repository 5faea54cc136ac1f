//! Plugin files: one `*.toml` file per plugin in the plugin directory.
//!
//! ```toml
//! name = "hello"
//! description = "Says hello"            # optional
//! command = ["printf", "alpha\nbeta\n"]  # argv, run without a shell
//! format = "lines"                       # lines | string | json | kv
//! timeout = "60s"                        # optional
//! ```
//! A file that fails to load is reported and skipped; the others keep working.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use vogeler_core::{duration, names::PluginName, wire::PluginInfo};

use crate::format::Format;

/// Used when a plugin file sets no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    command: Vec<String>,
    format: Format,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    timeout: Option<Duration>,
}

/// A loaded, valid plugin.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub name: PluginName,
    pub description: Option<String>,
    /// The program: a bare name is looked up on `PATH`, a relative path is resolved against
    /// the plugin file's directory (so a plugin can ship its script beside it).
    pub program: PathBuf,
    pub args: Vec<String>,
    pub format: Format,
    pub timeout: Duration,
    pub file: PathBuf,
    /// `sha256:<hex>` of the file, announced so the server can see which version runs.
    pub hash: String,
}

/// A plugin file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

/// Every plugin of a directory, plus the files that were skipped.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    plugins: BTreeMap<PluginName, Plugin>,
    pub problems: Vec<Problem>,
}

impl Catalog {
    pub fn get(&self, name: &PluginName) -> Option<&Plugin> {
        self.plugins.get(name)
    }
    pub fn plugins(&self) -> impl Iterator<Item = &Plugin> {
        self.plugins.values()
    }
    pub fn len(&self) -> usize {
        self.plugins.len()
    }
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
    /// What the agent announces.
    pub fn infos(&self) -> Vec<PluginInfo> {
        self.plugins()
            .map(|p| PluginInfo {
                name: p.name.clone(),
                hash: p.hash.clone(),
            })
            .collect()
    }

    /// Load every `*.toml` file of `dir`, in name order.
    pub fn load_dir(dir: &Path) -> Result<Self, Problem> {
        let entries = std::fs::read_dir(dir).map_err(|e| Problem {
            file: dir.to_path_buf(),
            message: format!("cannot read plugin directory: {e}"),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();

        let mut catalog = Catalog::default();
        let mut by_name: BTreeMap<PluginName, Vec<Plugin>> = BTreeMap::new();
        for file in files {
            match load_file(&file) {
                Ok(p) => by_name.entry(p.name.clone()).or_default().push(p),
                Err(message) => catalog.problems.push(Problem { file, message }),
            }
        }
        for (name, mut defs) in by_name {
            if defs.len() == 1 {
                let p = defs.remove(0);
                catalog.plugins.insert(name, p);
                continue;
            }
            // Neither wins: running the "wrong" one silently would be worse than running none.
            let files: Vec<String> = defs.iter().map(|p| p.file.display().to_string()).collect();
            for p in defs {
                catalog.problems.push(Problem {
                    file: p.file,
                    message: format!(
                        "plugin {name:?} is defined more than once ({}); fix one",
                        files.join(", ")
                    ),
                });
            }
        }
        Ok(catalog)
    }
}

/// Load and validate one plugin file.
pub fn load_file(path: &Path) -> Result<Plugin, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| "not UTF-8".to_string())?;
    let raw: PluginFile =
        toml::from_str(text).map_err(|e| e.message().to_string() + &location(text, e.span()))?;
    let name = PluginName::new(raw.name).map_err(|e| e.to_string())?;
    let mut command = raw.command.into_iter();
    let program = command
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("command is empty: give the program and its arguments")?;
    let program = PathBuf::from(program);
    let program = if program.is_relative() && program.components().count() > 1 {
        path.parent().unwrap_or(Path::new(".")).join(program)
    } else {
        program
    };
    let timeout = raw.timeout.unwrap_or(DEFAULT_TIMEOUT);
    if timeout.is_zero() {
        return Err("timeout must be longer than zero".into());
    }
    Ok(Plugin {
        name,
        description: raw.description,
        program,
        args: command.collect(),
        format: raw.format,
        timeout,
        file: path.to_path_buf(),
        hash: format!("sha256:{:x}", Sha256::digest(&bytes)),
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

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for (name, body) in files {
            std::fs::write(d.path().join(name), body).expect("write");
        }
        d
    }

    const HELLO: &str =
        "name = \"hello\"\ncommand = [\"printf\", \"a\\nb\\n\"]\nformat = \"lines\"\n";

    #[test]
    fn loads_valid_and_reports_broken_files() {
        let d = dir_with(&[
            ("hello.toml", HELLO),
            (
                "typo.toml",
                "name = \"x\"\ncomand = [\"true\"]\nformat = \"lines\"\n",
            ),
            (
                "badfmt.toml",
                "name = \"y\"\ncommand = [\"true\"]\nformat = \"xml\"\n",
            ),
            (
                "reserved.toml",
                "name = \"vogeler\"\ncommand = [\"true\"]\nformat = \"lines\"\n",
            ),
            (
                "underscore.toml",
                "name = \"_id\"\ncommand = [\"true\"]\nformat = \"lines\"\n",
            ),
            (
                "empty.toml",
                "name = \"e\"\ncommand = []\nformat = \"lines\"\n",
            ),
            ("notes.txt", "ignored"),
        ]);
        let c = Catalog::load_dir(d.path()).expect("dir");
        assert_eq!(c.len(), 1);
        let hello = c
            .get(&PluginName::new("hello").expect("name"))
            .expect("hello");
        assert_eq!(hello.program, PathBuf::from("printf"));
        assert_eq!(hello.args, vec!["a\nb\n".to_string()]);
        assert_eq!(hello.timeout, DEFAULT_TIMEOUT);
        assert!(hello.hash.starts_with("sha256:"));
        let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 5, "{text:#?}");
        for (file, needle) in [
            ("typo.toml", "comand"),
            ("badfmt.toml", "xml"),
            ("reserved.toml", "reserved"),
            ("underscore.toml", "must start"),
            ("empty.toml", "command is empty"),
        ] {
            assert!(
                text.iter().any(|t| t.contains(file) && t.contains(needle)),
                "{file}: {text:#?}"
            );
        }
    }

    #[test]
    fn duplicate_names_disable_both() {
        let d = dir_with(&[("a.toml", HELLO), ("b.toml", HELLO)]);
        let c = Catalog::load_dir(d.path()).expect("dir");
        assert!(c.is_empty());
        assert_eq!(c.problems.len(), 2);
        assert!(c.problems[0].message.contains("more than once"));
    }

    #[test]
    fn relative_program_resolves_beside_the_file() {
        let d = dir_with(&[(
            "s.toml",
            "name = \"s\"\ncommand = [\"./s.sh\", \"x\"]\nformat = \"json\"\ntimeout = \"5s\"\n",
        )]);
        let c = Catalog::load_dir(d.path()).expect("dir");
        let p = c.get(&PluginName::new("s").expect("name")).expect("s");
        assert_eq!(p.program, d.path().join("./s.sh"));
        assert_eq!(p.timeout, Duration::from_secs(5));
    }

    #[test]
    fn shipped_plugins_all_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let c = Catalog::load_dir(&dir).expect("plugins/");
        assert!(c.problems.is_empty(), "{:#?}", c.problems);
        for name in ["hello", "dpkg", "rpms", "os_release", "kernel"] {
            assert!(
                c.get(&PluginName::new(name).expect("name")).is_some(),
                "{name}"
            );
        }
    }

    #[test]
    fn missing_directory_is_a_problem() {
        let err = Catalog::load_dir(Path::new("/nonexistent/plugins.d")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/plugins.d"));
    }
}
