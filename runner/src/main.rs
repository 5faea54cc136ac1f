//! `vogeler-runner`: parse flags, load config, run one query, print the table.

use std::process::ExitCode;

use clap::Parser;
use vogeler_core::{
    cli::{CommonArgs, CouchArgs},
    config, exit,
    names::PluginName,
    shutdown, telemetry,
    wire::Target,
};
use vogeler_runner::{Query, parse_target};

/// Ask a set of nodes to run a plugin and show who answered. Results are also stored in
/// CouchDB by vogeler-server. Results go to stdout, logs to stderr.
#[derive(Debug, Parser)]
#[command(
    name = "vogeler-runner",
    version,
    args_override_self = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = concat!(
        "Examples:\n",
        "  vogeler-runner -c rpms -n all            every registered node\n",
        "  vogeler-runner -c facts -n web01 --timeout 3\n",
        "  vogeler-runner -c dpkg -n all --timeout 500ms\n\n",
        "Exit codes: 0 every node answered ok; 1 a node failed or did not answer; 2 usage;\n",
        "69 broker or database unavailable; 78 bad configuration.\n",
    ),
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    couch: CouchArgs,

    /// Plugin to run on the nodes (as named in their plugin files)
    #[arg(short = 'c', long = "command", value_name = "PLUGIN", value_parser = PluginName::new_checked)]
    plugin: PluginName,

    /// Nodes: `all` (every registered node) or one node name
    #[arg(short = 'n', long = "nodes", value_name = "NODES", value_parser = parse_target, default_value = "all")]
    nodes: Target,

    /// How long to wait for replies, in seconds (10) or with a unit (500ms)
    /// [env: VOGELER_RUNNER__TIMEOUT] [default: 10]
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,

    /// Validate the configuration, print the problems, and exit (0 valid, 78 invalid)
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = cli.common.sources();
    cli.couch.add_to(&mut sources);
    sources.set("runner.timeout", cli.timeout.as_ref());
    let settings = match config::load(&sources).and_then(|raw| raw.runner()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vogeler-runner: {e}");
            return exit::code(exit::CONFIG);
        }
    };
    if cli.check_config {
        println!("vogeler-runner: configuration is valid");
        return exit::code(exit::OK);
    }
    telemetry::init(&settings.log_level);
    let query = Query {
        plugin: cli.plugin,
        target: cli.nodes,
        timeout: settings.timeout,
    };
    exit::block_on("vogeler-runner", async {
        match vogeler_runner::query(&settings, &query, &shutdown::on_signals()).await {
            Ok(report) => {
                print!("{}", report.render_table());
                exit::code(if report.success() {
                    exit::OK
                } else {
                    exit::FAILURE
                })
            }
            Err(e) => {
                eprintln!("vogeler-runner: {e}");
                exit::code(if e.is_unavailable() {
                    exit::UNAVAILABLE
                } else {
                    exit::FAILURE
                })
            }
        }
    })
}
