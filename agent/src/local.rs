//! `vogeler-agent plugins list|check|run`: tools for plugin authors and config management.
//! They read only the plugin directory: no broker, no config file.

use std::{fmt::Write as _, path::Path};

use vogeler_proto::{names::PluginName, wire::Outcome};

use crate::{exec, plugin::Catalog};

/// A plugin file's schedule as `plugins list` shows it (`[agent.schedule]` in the agent's
/// config may override it; `--print-config` shows the overrides).
fn every(p: &crate::plugin::Plugin) -> String {
    use vogeler_proto::duration::format;
    match (p.interval, p.splay) {
        (None, _) => "-".into(),
        (Some(i), None) => format(i),
        (Some(i), Some(s)) => format!("{}~{}", format(i), format(s)),
    }
}

/// A plugin's version order as `plugins list` shows it: declared with `packages`, or the one
/// `dpkg` and `rpms` have by name (readers treat both alike).
fn packages(p: &crate::plugin::Plugin) -> &'static str {
    p.package_order().map_or("-", |s| s.name())
}

/// `plugins list`: one line per plugin and per skipped file.
pub fn list(dir: &Path) -> Result<String, String> {
    let c = Catalog::load_dir(dir).map_err(|p| p.to_string())?;
    let mut out = String::new();
    let width = c
        .plugins()
        .map(|p| p.name.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<width$}  {:<7}  {:<8}  {:<10}  {:<8}  FILE",
        "NAME", "FORMAT", "STATUS", "INTERVAL", "PACKAGES"
    );
    for p in c.plugins() {
        let status = if crate::plugin::warnings(p).is_empty() {
            "ok"
        } else {
            "warning"
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {:<8}  {:<10}  {:<8}  {}",
            p.name,
            p.format.name(),
            status,
            every(p),
            packages(p),
            p.file.display()
        );
    }
    for p in &c.problems {
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {:<8}  {:<10}  {:<8}  {}",
            "-", "-", "error", "-", "-", p
        );
    }
    for w in &c.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    Ok(out)
}

/// `plugins check`: every problem, each naming its file; `Ok` when all files are valid.
/// A program or user missing on this machine is a warning, not an error: config management
/// validates files for many machines on one.
pub fn check(dir: &Path) -> Result<String, String> {
    let c = Catalog::load_dir(dir).map_err(|p| p.to_string())?;
    let mut out = String::new();
    for p in &c.problems {
        let _ = writeln!(out, "error: {p}");
    }
    for w in &c.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(
        out,
        "{} plugin(s) valid, {} error(s), {} warning(s) in {}",
        c.len(),
        c.problems.len(),
        c.warnings.len(),
        dir.display()
    );
    if c.problems.is_empty() {
        Ok(out)
    } else {
        Err(out)
    }
}

/// `plugins check FILE`: validate one file before it is put in place (a `validate_cmd` gets
/// a temporary path, so the file's name is not checked, only its content).
pub fn check_file(file: &Path) -> Result<String, String> {
    let mut out = String::new();
    let mut ok = true;
    let mut count = 0;
    for loaded in crate::plugin::load_file(file) {
        match loaded {
            Ok(p) => {
                count += 1;
                for w in crate::plugin::warnings(&p) {
                    let _ = writeln!(out, "warning: {}: {w}", file.display());
                }
            }
            Err(e) => {
                ok = false;
                let _ = writeln!(out, "error: {}: {e}", file.display());
            }
        }
    }
    let _ = writeln!(out, "{count} plugin(s) valid in {}", file.display());
    if ok { Ok(out) } else { Err(out) }
}

/// `plugins run`: run one plugin here, exactly as the agent would.
pub async fn run(dir: &Path, name: &PluginName) -> Result<exec::Execution, String> {
    let c = Catalog::load_dir(dir).map_err(|p| p.to_string())?;
    let Some(plugin) = c.get(name) else {
        let problems: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
        let hint = if problems.is_empty() {
            String::new()
        } else {
            format!("; skipped files:\n  {}", problems.join("\n  "))
        };
        return Err(format!("no plugin {name:?} in {}{hint}", dir.display()));
    };
    Ok(exec::execute(plugin).await)
}

/// One line for stderr describing how a run ended.
pub fn describe(e: &exec::Execution) -> String {
    let what = match &e.outcome {
        Outcome::Ok => "completed".to_string(),
        other => other
            .error_text()
            .unwrap_or_else(|| other.status().to_string()),
    };
    let truncated = if e.truncated {
        " (output truncated)"
    } else {
        ""
    };
    format!(
        "{} in {} ms{truncated}: {what}",
        e.outcome.status(),
        e.duration.as_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_shows_each_plugins_schedule_and_version_order() {
        let d = tempfile::tempdir().expect("tempdir");
        for (file, text) in [
            (
                "pip.toml",
                "name = \"pip\"\ncommand = [\"id\"]\nformat = \"json\"\npackages = \"rpm\"\n",
            ),
            (
                "dpkg.toml",
                "name = \"dpkg\"\ncommand = [\"id\"]\nformat = \"fields\"\nfields = [\"name\", \"version\"]\ninterval = \"6h\"\n",
            ),
            (
                "hello.toml",
                "name = \"hello\"\ncommand = [\"id\"]\nformat = \"lines\"\n",
            ),
        ] {
            std::fs::write(d.path().join(file), text).expect("write");
        }
        let out = list(d.path()).expect("list");
        let rows: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().take(5).collect())
            .collect();
        assert_eq!(
            rows,
            [
                ["NAME", "FORMAT", "STATUS", "INTERVAL", "PACKAGES"],
                ["dpkg", "fields", "ok", "6h", "dpkg"],
                ["hello", "lines", "ok", "-", "-"],
                ["pip", "json", "ok", "-", "rpm"],
            ]
            .map(|r| r.to_vec()),
            "{out}"
        );
    }
}
