//! `vogeler-agent`: parse flags, load config, start logging, run the agent.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use vogeler_agent::cli::{Cli, Command, PluginsAction};
use vogeler_config as config;
use vogeler_core::{exit, shutdown, telemetry};

/// The plugin directory for local tools: the flag, else the environment, else the default.
fn plugin_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("VOGELER_AGENT__PLUGIN_DIR").map(PathBuf::from))
        .unwrap_or_else(|| config::defaults::PLUGIN_DIR.into())
}

fn plugins(action: PluginsAction) -> ExitCode {
    match action {
        PluginsAction::List { plugin_dir: dir } => {
            match vogeler_agent::local::list(&plugin_dir(dir)) {
                Ok(text) => {
                    print!("{text}");
                    exit::code(exit::OK)
                }
                Err(e) => {
                    eprintln!("vogeler-agent: {e}");
                    exit::code(exit::CONFIG)
                }
            }
        }
        PluginsAction::Check { path } => {
            let path = plugin_dir(path);
            let result = if path.is_file() {
                vogeler_agent::local::check_file(&path)
            } else {
                vogeler_agent::local::check(&path)
            };
            match result {
                Ok(text) => {
                    print!("{text}");
                    exit::code(exit::OK)
                }
                Err(text) => {
                    eprint!("{text}");
                    exit::code(exit::CONFIG)
                }
            }
        }
        PluginsAction::Run {
            name,
            plugin_dir: dir,
        } => exit::block_on("vogeler-agent", async move {
            match vogeler_agent::local::run(&plugin_dir(dir), &name).await {
                Ok(e) => {
                    eprintln!(
                        "vogeler-agent: plugin {name}: {}",
                        vogeler_agent::local::describe(&e)
                    );
                    match &e.value {
                        Some(v) if e.outcome.is_ok() => {
                            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
                            exit::code(exit::OK)
                        }
                        _ => exit::code(exit::FAILURE),
                    }
                }
                Err(e) => {
                    eprintln!("vogeler-agent: {e}");
                    exit::code(exit::FAILURE)
                }
            }
        }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let show_key = matches!(cli.command, Some(Command::Key));
    let simulation = match cli.command {
        Some(Command::Plugins { action }) => return plugins(action),
        Some(Command::Key) => None,
        Some(Command::Simulate {
            count,
            prefix,
            per_connection,
            max_runs,
        }) => Some(vogeler_agent::simulate::Simulation {
            count: count as usize,
            prefix,
            per_connection: per_connection as usize,
            concurrency: max_runs as usize,
        }),
        None => None,
    };
    let mut sources = cli.common.sources();
    sources
        .set("agent.http_listen", cli.http_listen.as_ref())
        .set("agent.node", cli.node.as_ref())
        .set(
            "agent.plugin_dir",
            cli.plugin_dir.as_ref().map(|p| p.display()),
        )
        .set("agent.concurrency", cli.concurrency)
        .set("agent.heartbeat", cli.heartbeat.as_ref())
        .set(
            "agent.authorized_keys",
            cli.authorized_keys.as_ref().map(|p| p.display()),
        )
        .set(
            "agent.state_dir",
            cli.state_dir.as_ref().map(|p| p.display()),
        );
    let loaded = config::load(&sources).and_then(|raw| raw.agent(vogeler_agent::hostname()));
    let settings = match vogeler_core::cli::settings_or_exit("vogeler-agent", loaded, &cli.config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if show_key {
        return match vogeler_agent::security::node_key(&settings) {
            Ok(key) => {
                println!("node {}: key {}", settings.node, key.id());
                println!("{}", key.to_line(settings.node.as_str()));
                exit::code(exit::OK)
            }
            Err(e) => {
                eprintln!("vogeler-agent: {e}");
                exit::code(vogeler_core::exit::ExitStatus::exit_code(&e))
            }
        };
    }
    telemetry::init(&settings.log_level);
    tracing::info!(settings = ?settings, "configuration (secrets redacted)");
    vogeler_core::cli::start("vogeler-agent", async {
        let cancel = shutdown::on_signals();
        match simulation {
            Some(sim) => {
                vogeler_agent::simulate::run(settings, sim, cancel, Default::default()).await
            }
            None => vogeler_agent::run(settings, cancel).await,
        }
        .map(|()| exit::OK)
    })
}
