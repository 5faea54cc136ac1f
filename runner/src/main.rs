//! `vogeler-runner`: parse flags, load config, run one query, print the table.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    subcommand_negates_reqs = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = concat!(
        "Examples:\n",
        "  vogeler-runner -c rpms -n all            every registered node\n",
        "  vogeler-runner -c facts -n web01 --timeout 3\n",
        "  vogeler-runner -c dpkg -n all --timeout 500ms\n",
        "  vogeler-runner find package openssl=3.0.11-1   nodes with that package (from CouchDB)\n",
        "  vogeler-runner find fact os.family=Debian\n",
        "  vogeler-runner history web01 dpkg             how a plugin's value changed\n\n",
        "Exit codes: 0 every node answered ok; 1 a node failed or did not answer; 2 usage;\n",
        "69 broker or database unavailable; 78 bad configuration.\n",
    ),
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    couch: CouchArgs,

    /// Plugin to run on the nodes (as named in their plugin files)
    #[arg(short = 'c', long = "command", value_name = "PLUGIN", value_parser = PluginName::new_checked, required = true)]
    plugin: Option<PluginName>,

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

#[derive(Debug, Subcommand)]
enum Command {
    /// Find nodes in the inventory (no fan-out): one node name per line
    Find {
        #[command(subcommand)]
        what: Find,
    },
    /// Show each recorded change of a plugin's value on a node: for lists the added (+) and
    /// removed (-) entries, otherwise the old and new values
    History {
        /// The node's name
        node: String,
        /// The plugin's name
        plugin: String,
    },
}

#[derive(Debug, Subcommand)]
enum Find {
    /// Nodes with an installed package (from the dpkg and rpms plugins): NAME or NAME=VERSION
    Package {
        #[arg(value_name = "NAME[=VERSION]", value_parser = vogeler_runner::inventory::parse_package)]
        spec: (String, Option<String>),
    },
    /// Nodes whose reported fact has a value: KEY=VALUE, e.g. os.family=Debian, kernel=6.1.0-18-amd64
    Fact {
        #[arg(value_name = "KEY=VALUE", value_parser = vogeler_runner::inventory::parse_fact)]
        spec: (String, serde_json::Value),
    },
}

async fn inventory(settings: &vogeler_core::config::RunnerSettings, command: Command) -> ExitCode {
    use vogeler_runner::inventory as inv;
    let result = match command {
        Command::Find {
            what: Find::Package {
                spec: (name, version),
            },
        } => inv::find_package(&settings.couch, &name, version.as_deref())
            .await
            .map(|n| lines(&n)),
        Command::Find {
            what: Find::Fact { spec: (key, value) },
        } => inv::find_fact(&settings.couch, &key, &value)
            .await
            .map(|n| lines(&n)),
        Command::History { node, plugin } => inv::history(&settings.couch, &node, &plugin)
            .await
            .map(|h| inv::render_history(&h)),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            exit::code(exit::OK)
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
}

fn lines(names: &[String]) -> String {
    names.iter().map(|n| format!("{n}\n")).collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = cli.common.sources();
    cli.couch.add_to(&mut sources);
    sources.set("runner.timeout", cli.timeout.as_ref());
    let loaded = config::load(&sources).and_then(|raw| raw.runner());
    let settings =
        match vogeler_core::cli::settings_or_exit("vogeler-runner", loaded, cli.check_config) {
            Ok(s) => s,
            Err(code) => return code,
        };
    telemetry::init(&settings.log_level);
    if let Some(command) = cli.command {
        return exit::block_on("vogeler-runner", inventory(&settings, command));
    }
    let Some(plugin) = cli.plugin else {
        unreachable!("clap requires -c without a subcommand")
    };
    let query = Query {
        plugin,
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
