//! `vogeler-agent`: parse flags, load config, start logging, run the agent.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use vogeler_core::{cli::CommonArgs, config, exit, shutdown, telemetry};

/// Run on every node: wait for commands from `vogeler-runner`, run the named plugin from the
/// plugin directory (never anything else) and publish the result for `vogeler-server`.
#[derive(Debug, Parser)]
#[command(
    name = "vogeler-agent",
    version,
    args_override_self = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = concat!(
        "Example:\n  vogeler-agent --node web01 --plugin-dir ./plugins\n\n",
        "Plugins are *.toml files: name, command (argv, no shell), format (lines, string, json, kv),\n",
        "optional description and timeout (default 60s).\n\n",
    ),
)]
struct Cli {
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

    /// Validate the configuration, print the problems, and exit (0 valid, 78 invalid)
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = cli.common.sources();
    sources
        .set("agent.node", cli.node.as_ref())
        .set(
            "agent.plugin_dir",
            cli.plugin_dir.as_ref().map(|p| p.display()),
        )
        .set("agent.concurrency", cli.concurrency);
    let settings = match config::load(&sources).and_then(|raw| raw.agent(vogeler_agent::hostname()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vogeler-agent: {e}");
            return exit::code(exit::CONFIG);
        }
    };
    if cli.check_config {
        println!(
            "vogeler-agent: configuration is valid (node {})",
            settings.node
        );
        return exit::code(exit::OK);
    }
    telemetry::init(&settings.log_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vogeler-agent: cannot start the async runtime: {e}");
            return exit::code(exit::FAILURE);
        }
    };
    runtime.block_on(async {
        match vogeler_agent::run(settings, shutdown::on_signals()).await {
            Ok(()) => exit::code(exit::OK),
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
