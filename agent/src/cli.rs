//! `vogeler-agent`'s command line, in the library so that man pages and shell completions
//! are generated from the same definitions (see `dist/`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vogeler_core::cli::{CommonArgs, ConfigArgs};
use vogeler_proto::names::PluginName;

/// Run on every node: wait for commands from `vogeler-runner`, run the named plugin from the
/// plugin directory (never anything else) and publish the result for `vogeler-server`.
#[derive(Debug, Parser)]
#[command(
    name = "vogeler-agent",
    version,
    args_override_self = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = format!(
        "{}{}",
        concat!(
            "Example:\n  vogeler-agent --node web01 --plugin-dir ./plugins --authorized-keys ./keys/runner.pub --state-dir ./state\n\n",
            "Every command must be signed by a key in --authorized-keys (see `vogeler-runner keygen`);\n",
            "refused commands are logged, and every command is recorded in <state-dir>/<node>/audit.log.\n\n",
        ),
        vogeler_plugin_spec::help(),
    ),
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: CommonArgs,

    /// This node's name: its document id in CouchDB [env: VOGELER_AGENT__NODE] [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Directory of plugin files [env: VOGELER_AGENT__PLUGIN_DIR] [default: /etc/vogeler/plugins.d]
    #[arg(long, value_name = "DIR")]
    pub plugin_dir: Option<PathBuf>,

    /// Plugin runs allowed at once [env: VOGELER_AGENT__CONCURRENCY] [default: 4]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,

    /// How often to re-announce this node to the server, in seconds or with a unit
    /// [env: VOGELER_AGENT__HEARTBEAT] [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub heartbeat: Option<String>,

    /// Runner public keys to obey: a file of `ed25519 <key>` lines (optionally restricted,
    /// `plugins=dpkg nodes=web* ed25519 ...`) or a directory of *.pub files. Without one the
    /// agent refuses to start [env: VOGELER_AGENT__AUTHORIZED_KEYS]
    /// [default: /etc/vogeler/keys/authorized_keys]
    #[arg(long, value_name = "PATH")]
    pub authorized_keys: Option<PathBuf>,

    /// Base directory for this node's key, replay cache and audit log (kept in
    /// DIR/<node>/) [env: VOGELER_AGENT__STATE_DIR] [default: /var/lib/vogeler]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Serve /healthz and /metrics (Prometheus) on this local address, e.g. 127.0.0.1:9188
    /// [env: VOGELER_AGENT__HTTP_LISTEN] [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub http_listen: Option<String>,

    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with plugin files on this machine: no broker and no config file needed
    #[command(after_long_help = vogeler_plugin_spec::help())]
    Plugins {
        #[command(subcommand)]
        action: PluginsAction,
    },
    /// Print this node's key id (and public key), to compare with `vogeler-runner nodes
    /// pending` before accepting the node. Creates the key if the agent never ran
    Key,
    /// Run many simulated nodes in this one process, for load tests and benchmarks
    ///
    /// Each is a full agent (its own name PREFIX0001..., key, state directory, queue and real
    /// plugin runs) configured like this agent; they share broker connections, the plugin
    /// directory and a limit on plugin processes running at once. The agent's own flags go
    /// before `simulate`: vogeler-agent --plugin-dir ./plugins simulate --count 1000 --prefix sim-
    Simulate {
        /// How many nodes
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: u32,
        /// Node name prefix; names are the prefix and a four-digit number
        #[arg(long, value_name = "PREFIX", default_value = "sim-")]
        prefix: String,
        /// Nodes per broker connection (each node has its own channels)
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        per_connection: u32,
        /// Plugin processes running at once across all nodes
        #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        max_runs: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginsAction {
    /// List the plugins of a directory: name, format, status, interval, package order, file
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// `--help` (and so the man page) lists every plugin-file key and format, for the agent
    /// and for `vogeler-agent plugins`.
    #[test]
    fn help_lists_every_plugin_key_and_format() {
        let cmd = Cli::command();
        let plugins = cmd.find_subcommand("plugins").expect("plugins");
        for help in [
            cmd.get_after_long_help()
                .map(|h| h.to_string())
                .unwrap_or_default(),
            plugins
                .get_after_long_help()
                .map(|h| h.to_string())
                .unwrap_or_default(),
        ] {
            let entries = vogeler_plugin_spec::KEYS
                .iter()
                .chain(vogeler_plugin_spec::format::FORMATS)
                .chain(vogeler_plugin_spec::legacy::KEYS);
            for (name, about) in entries {
                assert!(
                    help.lines().any(|l| l.starts_with(&format!("  {name} "))),
                    "{name} missing from:\n{help}"
                );
                let first = about.split(' ').next().unwrap_or_default();
                assert!(help.contains(first), "{name}'s description missing");
            }
        }
    }
}
