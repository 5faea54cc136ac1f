//! Man pages and shell completions for the three programs, generated from the same clap
//! definitions the programs parse with, so they cannot drift from `--help`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// Each program's command definition.
pub fn programs() -> Vec<clap::Command> {
    vec![
        vogeler_agent::cli::Cli::command(),
        vogeler_server::cli::Cli::command(),
        vogeler_runner::cli::Cli::command(),
    ]
}

/// The shells we ship completions for, with the file name each expects for `program`
/// (the paths Debian's bash-completion, zsh and fish packages look in).
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

fn completion_file(shell: Shell, program: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{program}"),
        Shell::Fish => format!("{program}.fish"),
        _ => program.to_string(),
    }
}

/// Write `OUT/man/*.1` (one page per program and per subcommand) and
/// `OUT/completions/{bash,zsh,fish}/...`. Returns the files written.
pub fn write_assets(out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    for cmd in programs() {
        // Building first gives every subcommand its full bin name for the SYNOPSIS
        // ("vogeler-runner nodes forget").
        let mut built = cmd.clone().disable_help_subcommand(true);
        built.build();
        write_man(&man, built, &mut written)?;
        let name = cmd.get_name().to_string();
        for (shell, dir) in SHELLS {
            let dir = out.join("completions").join(dir);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join(completion_file(shell, &name));
            let mut file = std::fs::File::create(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut file);
            written.push(path);
        }
    }
    Ok(written)
}

/// One page for `cmd`, then one per subcommand (`vogeler-runner-keygen.1`), the way git and
/// cargo ship theirs.
fn write_man(dir: &Path, cmd: clap::Command, written: &mut Vec<PathBuf>) -> Result<()> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .with_context(|| format!("cannot render the man page of {name}"))?;
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub = sub
            .clone()
            .display_name(format!("{name}-{}", sub.get_name()));
        write_man(dir, sub, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_cover_every_program_and_flag() {
        let out = tempfile::tempdir().expect("dir");
        let files = write_assets(out.path()).expect("written");
        let man = std::fs::read_to_string(out.path().join("man/vogeler-agent.1")).expect("page");
        assert!(man.contains("check\\-config"), "{man}");
        assert!(man.contains("authorized\\-keys"));
        // The plugin-file reference, from the tables the parser uses.
        for page in ["vogeler-agent.1", "vogeler-agent-plugins.1"] {
            let text = std::fs::read_to_string(out.path().join("man").join(page)).expect(page);
            let entries = vogeler_plugin_spec::KEYS
                .iter()
                .chain(vogeler_plugin_spec::format::FORMATS)
                .chain(vogeler_plugin_spec::legacy::KEYS);
            for (name, _) in entries {
                assert!(text.contains(&format!("\n  {name} ")), "{page}: {name}");
            }
        }
        let runner =
            std::fs::read_to_string(out.path().join("man/vogeler-runner.1")).expect("runner page");
        assert!(runner.contains("csv a header line"), "{runner}");
        let keygen = out.path().join("man/vogeler-runner-keygen.1");
        assert!(keygen.is_file(), "{files:?}");
        assert!(
            out.path()
                .join("man/vogeler-runner-nodes-forget.1")
                .is_file()
        );
        let bash = std::fs::read_to_string(out.path().join("completions/bash/vogeler-runner"))
            .expect("bash");
        assert!(
            bash.contains("--print-config") && bash.contains("keygen"),
            "{bash}"
        );
        assert!(out.path().join("completions/zsh/_vogeler-server").is_file());
        assert!(
            out.path()
                .join("completions/fish/vogeler-agent.fish")
                .is_file()
        );
    }
}
