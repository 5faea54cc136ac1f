//! `vogeler-agent`: parse flags, load config, start logging, run the agent.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use vogeler_core::{cli::CommonArgs, config, exit, names::PluginName, shutdown, telemetry};

/// Run on every node: wait for commands from `vogeler-runner`, run the named plugin from the
/// plugin directory (never anything else) and publish the result for `vogeler-server`.
#[derive(Debug, Parser)]
#[command(
    name = "vogeler-agent",
    version,
    args_override_self = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = concat!(
        "Example:\n  vogeler-agent --node web01 --plugin-dir ./plugins --authorized-keys ./keys/runner.pub --state-dir ./state\n\n",
        "Every command must be signed by a key in --authorized-keys (see `vogeler-runner keygen`);\n",
        "refused commands are logged, and every command is recorded in <state-dir>/<node>/audit.log.\n\n",
        "Plugins are *.toml files: name, command (argv, no shell), format (lines, string, json, kv),\n",
        "optional description and timeout (default 60s).\n\n",
    ),
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    common: CommonArgs,

    /// This node's name: its document id in CouchDB [env: VOGELER_AGENT__NODE] [default: the host name]
    #[arg(long, value_name = "NAME")]
    node: Option<String>,

    /// Directory of plugin files [env: VOGELER_AGENT__PLUGIN_DIR] [default: /etc/vogeler/plugins.d]
    #[arg(long, value_name = "DIR")]
    plugin_dir: Option<PathBuf>,

    /// Plugin runs allowed at once [env: VOGELER_AGENT__CONCURRENCY] [default: 4]
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,

    /// How often to re-announce this node to the server, in seconds or with a unit
    /// [env: VOGELER_AGENT__HEARTBEAT] [default: 60s]
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,

    /// Runner public keys to obey: a file of `ed25519 <key>` lines (optionally restricted,
    /// `plugins=dpkg nodes=web* ed25519 ...`) or a directory of *.pub files. Without one the
    /// agent refuses to start [env: VOGELER_AGENT__AUTHORIZED_KEYS]
    /// [default: /etc/vogeler/keys/authorized_keys]
    #[arg(long, value_name = "PATH")]
    authorized_keys: Option<PathBuf>,

    /// Base directory for this node's key, replay cache and audit log (kept in
    /// DIR/<node>/) [env: VOGELER_AGENT__STATE_DIR] [default: /var/lib/vogeler]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Serve /healthz and /metrics (Prometheus) on this local address, e.g. 127.0.0.1:9188
    /// [env: VOGELER_AGENT__HTTP_LISTEN] [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    http_listen: Option<String>,

    #[command(flatten)]
    config: vogeler_core::cli::ConfigArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with plugin files on this machine: no broker and no config file needed
    Plugins {
        #[command(subcommand)]
        action: PluginsAction,
    },
}

#[derive(Debug, Subcommand)]
enum PluginsAction {
    /// List the plugins of a directory: name, format, status, file
    List {
        /// Plugin directory [env: VOGELER_AGENT__PLUGIN_DIR] [default: /etc/vogeler/plugins.d]
        #[arg(long, value_name = "DIR")]
        plugin_dir: Option<PathBuf>,
    },
    /// Validate every plugin file and list all problems; exit 0 when all are valid, 78
    /// otherwise (use it as a Puppet/Ansible validate_cmd). A program missing on this machine
    /// is a warning, not an error
    Check {
        /// A plugin directory or a single plugin file [default: /etc/vogeler/plugins.d]
        path: Option<PathBuf>,
    },
    /// Run one plugin here, exactly as the agent would, and print its parsed value as JSON
    /// on stdout (diagnostics on stderr); exit 0 when it completed, 1 otherwise
    Run {
        /// The plugin's name
        #[arg(value_parser = PluginName::new_checked)]
        name: PluginName,
        /// Plugin directory [env: VOGELER_AGENT__PLUGIN_DIR] [default: /etc/vogeler/plugins.d]
        #[arg(long, value_name = "DIR")]
        plugin_dir: Option<PathBuf>,
    },
}

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
    if let Some(Command::Plugins { action }) = cli.command {
        return plugins(action);
    }
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
    telemetry::init(&settings.log_level);
    tracing::info!(settings = ?settings, "configuration (secrets redacted)");
    exit::block_on("vogeler-agent", async {
        match vogeler_agent::run(settings, shutdown::on_signals()).await {
            Ok(()) => exit::code(exit::OK),
            Err(e) if e.is_config() => {
                tracing::error!(error = %e, "agent cannot start");
                eprintln!("vogeler-agent: {e}");
                exit::code(exit::CONFIG)
            }
            Err(e) => {
                tracing::error!(error = %e, "agent stopped");
                eprintln!(
                    "vogeler-agent: {e}; check that the broker is running and the URL is right"
                );
                exit::code(if e.is_unavailable() {
                    exit::UNAVAILABLE
                } else {
                    exit::FAILURE
                })
            }
        }
    })
}
