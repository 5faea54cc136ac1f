//! Plugin files: drop-in files in the plugin directory, one or more plugins each, read into a
//! [`Catalog`]. What a file may say and how it is parsed is `vogeler_plugin_spec`'s; this
//! module reads the directory and checks what a definition needs on this machine. A file
//! that fails to load is reported and skipped; the others keep working.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};
pub use vogeler_plugin_spec::{
    DEFAULT_MAX_OUTPUT, DEFAULT_TIMEOUT, MAX_MAX_OUTPUT, Plugin, legacy, parse_text,
};
use vogeler_proto::{names::PluginName, version::Scheme, wire::PluginInfo};

/// A plugin file that could not be used (or a warning about one), and why.
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
    /// Files or definitions that were skipped.
    pub problems: Vec<Problem>,
    /// Valid definitions that will not run on this machine as they are (program or user
    /// missing): worth a look, not a reason to refuse the file.
    pub warnings: Vec<Problem>,
}

/// Is `name` a plugin file? Hidden files (editors' and config management's temporary
/// files) are not.
fn is_plugin_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(ext, Some("toml" | "cfg")) && path.is_file()
}

impl Catalog {
    pub fn contains(&self, name: &PluginName) -> bool {
        self.get(name).is_some()
    }

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

    /// The plugins that declare themselves package inventories, with their order: what the
    /// agent announces (`dpkg` and `rpms` without a declaration are ones by name, not listed).
    pub fn packages(&self) -> BTreeMap<String, Scheme> {
        self.plugins()
            .filter_map(|p| Some((p.name.to_string(), p.packages?)))
            .collect()
    }

    /// Load every `*.toml` and `*.cfg` file of `dir`, in name order.
    pub fn load_dir(dir: &Path) -> Result<Self, Problem> {
        let entries = std::fs::read_dir(dir).map_err(|e| Problem {
            file: dir.to_path_buf(),
            message: format!("cannot read plugin directory: {e}"),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_plugin_file(p))
            .collect();
        files.sort();

        let mut catalog = Catalog::default();
        let mut by_name: BTreeMap<PluginName, Vec<Plugin>> = BTreeMap::new();
        for file in files {
            for loaded in load_file(&file) {
                match loaded {
                    Ok(p) => by_name.entry(p.name.clone()).or_default().push(p),
                    Err(message) => catalog.problems.push(Problem {
                        file: file.clone(),
                        message,
                    }),
                }
            }
        }
        for (name, mut defs) in by_name {
            if defs.len() == 1 {
                let p = defs.remove(0);
                catalog
                    .warnings
                    .extend(warnings(&p).into_iter().map(|message| Problem {
                        file: p.file.clone(),
                        message,
                    }));
                catalog.plugins.insert(name, p);
                continue;
            }
            // Neither wins: running the "wrong" one silently would be worse than running none.
            let files: Vec<String> = defs.iter().map(|p| p.file.display().to_string()).collect();
            for p in defs {
                catalog.problems.push(Problem {
                    file: p.file,
                    message: format!(
                        "plugin {name:?} is defined more than once ({}); remove one",
                        files.join(", ")
                    ),
                });
            }
        }
        Ok(catalog)
    }

    /// What changed from `old` to `self`, by plugin name and file hash.
    pub fn diff(&self, old: &Catalog) -> CatalogDiff {
        let mut d = CatalogDiff::default();
        for (name, p) in &self.plugins {
            match old.plugins.get(name) {
                None => d.added.push(name.to_string()),
                Some(o) if o != p => d.changed.push(name.to_string()),
                Some(_) => {}
            }
        }
        d.removed = old
            .plugins
            .keys()
            .filter(|n| !self.plugins.contains_key(*n))
            .map(|n| n.to_string())
            .collect();
        d
    }
}

/// Plugins added, changed and removed by a reload.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CatalogDiff {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl CatalogDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Problems that will make every run of `plugin` fail on this machine, for `plugins check` and
/// logs.
pub fn warnings(plugin: &Plugin) -> Vec<String> {
    let mut w = vec![];
    if crate::exec::find_program(&plugin.program).is_none() {
        w.push(format!(
            "plugin {:?}: program {} not found on this machine",
            plugin.name.as_str(),
            plugin.program.display()
        ));
    }
    if let Some(user) = &plugin.user
        && !matches!(nix::unistd::User::from_name(user), Ok(Some(_)))
    {
        w.push(format!(
            "plugin {:?}: user {user:?} does not exist on this machine",
            plugin.name.as_str()
        ));
    }
    w
}

/// Load one plugin file: one result per definition in it (a `.cfg` file may hold several).
pub fn load_file(path: &Path) -> Vec<Result<Plugin, String>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return vec![Err(format!("cannot read: {e}"))],
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return vec![Err("not UTF-8".to_string())];
    };
    let hash = format!("sha256:{:x}", Sha256::digest(&bytes));
    parse_text(text, path, &hash)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::format::Format;

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
        assert_eq!(hello.max_output, DEFAULT_MAX_OUTPUT);
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
        assert_eq!(p.program, d.path().join("s.sh"));
        assert!(p.program.is_absolute());
        assert_eq!(p.timeout, Duration::from_secs(5));
    }

    #[test]
    fn legacy_cfg_files_load_unchanged() {
        let d = dir_with(&[
            (
                "rpms.cfg",
                "[rpm]\nname = rpm\ndescription = Grabs packages installed on a system using rpm\ncommand = rpm -qa --qf '%{NAME} %{VERSION}\\n'\nresult_format = output\ncommand_alias = get_rpms\n",
            ),
            (
                "multi.cfg",
                "# two plugins in one file\n[facter]\nname = facter\ncommand = facter -y\nresult_format = yaml\n\n[uname]\nname: kernel_name\ncommand: uname -s\nresult_format: string\n",
            ),
            (
                "broken.cfg",
                "[broken]\nname = broken\ndescription = This plugin should not work\ncommand = broken\nresult_format = broken\ncommand_alias = broken\n",
            ),
            (
                "typo.cfg",
                "[x]\nname = x\ncomand = true\nresult_format = output\n",
            ),
            (
                "quotes.cfg",
                "[q]\nname = q\ncommand = echo 'unbalanced\nresult_format = output\n",
            ),
        ]);
        let c = Catalog::load_dir(d.path()).expect("dir");
        let rpm = c.get(&PluginName::new("rpm").expect("name")).expect("rpm");
        assert_eq!(rpm.program, PathBuf::from("rpm"));
        assert_eq!(rpm.args, ["-qa", "--qf", "%{NAME} %{VERSION}\\n"]);
        assert_eq!(rpm.format, Format::Lines);
        assert_eq!(
            rpm.description.as_deref(),
            Some("Grabs packages installed on a system using rpm")
        );
        let facter = c
            .get(&PluginName::new("facter").expect("name"))
            .expect("facter");
        assert_eq!(
            (facter.format.name(), facter.args.as_slice()),
            ("yaml", ["-y".to_string()].as_slice())
        );
        assert_eq!(
            c.get(&PluginName::new("kernel_name").expect("name"))
                .expect("uname")
                .format,
            Format::String
        );
        let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        for (file, needle) in [
            ("broken.cfg", "result_format \"broken\""),
            ("typo.cfg", "unknown key \"comand\""),
            ("quotes.cfg", "unbalanced quotes"),
        ] {
            assert!(
                text.iter().any(|t| t.contains(file) && t.contains(needle)),
                "{file}: {text:#?}"
            );
        }
    }

    #[test]
    fn optional_fields_are_validated() {
        let d = dir_with(&[
            (
                "ok.toml",
                "name = \"ok\"\ncommand = [\"id\"]\nformat = \"fields\"\nfields = [\"a\", \"b\"]\nseparator = \":\"\nmax_output = \"512KiB\"\nuser = \"nobody\"\nenv = { TZ = \"UTC\" }\n",
            ),
            (
                "big.toml",
                "name = \"big\"\ncommand = [\"id\"]\nformat = \"raw\"\nmax_output = \"1GiB\"\n",
            ),
            (
                "unit.toml",
                "name = \"unit\"\ncommand = [\"id\"]\nformat = \"raw\"\nmax_output = \"4 parsecs\"\n",
            ),
            (
                "nofields.toml",
                "name = \"nf\"\ncommand = [\"id\"]\nformat = \"fields\"\n",
            ),
            (
                "hidden.toml",
                "name = \"hidden\"\ncommand = [\"id\"]\nformat = \"raw\"\n",
            ),
            (".hidden.toml", "this is an editor's temporary file"),
        ]);
        let c = Catalog::load_dir(d.path()).expect("dir");
        let ok = c.get(&PluginName::new("ok").expect("name")).expect("ok");
        assert_eq!(ok.max_output, 512 * 1024);
        assert_eq!(ok.user.as_deref(), Some("nobody"));
        assert_eq!(ok.env.get("TZ").map(String::as_str), Some("UTC"));
        assert!(c.get(&PluginName::new("hidden").expect("name")).is_some());
        let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text.iter()
                .any(|t| t.contains("big.toml") && t.contains("7 MiB")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("unit.toml") && t.contains("parsecs")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("nofields.toml") && t.contains("needs `fields`")),
            "{text:#?}"
        );
    }

    #[test]
    fn warnings_for_missing_programs_and_users() {
        let d = dir_with(&[
            (
                "a.toml",
                "name = \"a\"\ncommand = [\"rpm-not-installed-here\"]\nformat = \"lines\"\n",
            ),
            (
                "b.toml",
                "name = \"b\"\ncommand = [\"id\"]\nformat = \"lines\"\nuser = \"no-such-user-vogeler\"\n",
            ),
            (
                "c.toml",
                "name = \"c\"\ncommand = [\"./missing.sh\"]\nformat = \"lines\"\n",
            ),
        ]);
        let c = Catalog::load_dir(d.path()).expect("dir");
        assert_eq!(c.len(), 3, "warnings do not disable plugins");
        let text: Vec<String> = c.warnings.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(
            text[0].contains("rpm-not-installed-here not found"),
            "{text:#?}"
        );
        assert!(text[1].contains("no-such-user-vogeler"), "{text:#?}");
        assert!(text[2].contains("missing.sh not found"), "{text:#?}");
    }

    #[test]
    fn diff_names_added_changed_removed() {
        let d = dir_with(&[
            ("hello.toml", HELLO),
            (
                "gone.toml",
                "name = \"gone\"\ncommand = [\"id\"]\nformat = \"raw\"\n",
            ),
        ]);
        let before = Catalog::load_dir(d.path()).expect("dir");
        std::fs::remove_file(d.path().join("gone.toml")).expect("rm");
        std::fs::write(d.path().join("hello.toml"), HELLO.replace("a\\nb", "c")).expect("write");
        std::fs::write(
            d.path().join("new.toml"),
            "name = \"new\"\ncommand = [\"id\"]\nformat = \"raw\"\n",
        )
        .expect("write");
        let after = Catalog::load_dir(d.path()).expect("dir");
        let diff = after.diff(&before);
        assert_eq!(
            diff,
            CatalogDiff {
                added: vec!["new".into()],
                changed: vec!["hello".into()],
                removed: vec!["gone".into()]
            }
        );
        assert!(after.diff(&after).is_empty());
    }

    #[test]
    fn only_declared_package_plugins_are_announced_as_such() {
        let d = dir_with(&[
            (
                "pip.toml",
                "name = \"pip\"\ncommand = [\"id\"]\nformat = \"json\"\npackages = \"rpm\"\n",
            ),
            (
                "dpkg.toml",
                "name = \"dpkg\"\ncommand = [\"id\"]\nformat = \"fields\"\nfields = [\"name\", \"version\"]\n",
            ),
            ("hello.toml", HELLO),
            (
                "bad.toml",
                "name = \"bad\"\ncommand = [\"id\"]\nformat = \"lines\"\npackages = \"rpm\"\n",
            ),
        ]);
        let c = Catalog::load_dir(d.path()).expect("dir");
        assert_eq!(
            c.packages(),
            BTreeMap::from([("pip".to_string(), Scheme::Rpm)]),
            "dpkg is one by name, hello none, bad skipped"
        );
        assert!(
            c.problems.iter().any(|p| p.to_string().contains("bad.toml")
                && p.message.contains("format \"lines\" does not make")),
            "{:#?}",
            c.problems
        );
    }

    #[test]
    fn shipped_plugins_all_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let c = Catalog::load_dir(&dir).expect("plugins/");
        assert!(c.problems.is_empty(), "{:#?}", c.problems);
        for name in [
            "hello",
            "dpkg",
            "rpms",
            "os_release",
            "kernel",
            "facts",
            "facter",
            "kernel_modules",
            "services",
            "listening_ports",
            "disks",
            "users",
            "pip",
        ] {
            assert!(
                c.get(&PluginName::new(name).expect("name")).is_some(),
                "{name}"
            );
        }
        let pip = c.get(&PluginName::new("pip").expect("name"));
        assert_eq!(pip.and_then(|p| p.packages), Some(Scheme::Rpm));
        // rpm's order needs the epoch, which readers take from its own field.
        let rpms = c.get(&PluginName::new("rpms").expect("name"));
        assert!(
            rpms.is_some_and(
                |p| matches!(&p.format, crate::format::Format::Fields { names, .. }
                if names == &["name", "epoch", "version", "release", "arch"])
            ),
            "{rpms:?}"
        );
    }

    #[test]
    fn missing_directory_is_a_problem() {
        let err = Catalog::load_dir(Path::new("/nonexistent/plugins.d")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/plugins.d"));
    }
}
