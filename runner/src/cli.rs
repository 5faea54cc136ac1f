//! `vogeler-runner`'s command line, in the library so that man pages and shell completions
//! are generated from the same definitions (see `dist/`).

use clap::{Parser, Subcommand, ValueEnum};
use vogeler_core::cli::{CommonArgs, ConfigArgs, CouchArgs};
use vogeler_proto::names::{NodeName, PluginName};

use crate::{inventory as inv, output};

/// `--help`'s examples.
const EXAMPLES: &str = concat!(
    "Examples:\n",
    "  vogeler-runner -c rpms -n all                every registered node\n",
    "  vogeler-runner -c facts -n web01 --timeout 3\n",
    "  vogeler-runner -c dpkg -n 'web01,web02'\n",
    "  vogeler-runner -c dpkg -n 'web*'             globs: 'db-[0-9]*'\n",
    "  vogeler-runner -c dpkg -n @nodes.txt         names from a file; '-' reads stdin\n",
    "  vogeler-runner -c dpkg -n os.family=Debian   facts: = != =~ (regex) > < >= <=\n",
    "  vogeler-runner -c dpkg -n 'kernel=~^6\\.'  'memory_mb>16000'\n",
    "  vogeler-runner -c dpkg -n 'web* and not (os.family=RedHat or cpus<4)'\n",
    "  vogeler-runner -c restart_check -n 'dpkg has openssl < 3.0.13'   by stored values\n",
    "  vogeler-runner -c hello -n all --output jsonl | jq .\n",
    "  vogeler-runner -c rpms -n all --cached 1h      stored values up to 1h old, ask the rest\n",
    "  vogeler-runner -c upgrade_check -n 'web*' --batch 25% --batch-pause 30s\n",
    "  vogeler-runner nodes -n 'db*'                registered nodes, last seen, stale\n",
    "  vogeler-runner show web01 dpkg               a stored document or value\n",
    "  vogeler-runner find package openssl=3.0.11-1  nodes with that package (from CouchDB)\n",
    "  vogeler-runner find fact os.family=Debian\n",
    "  vogeler-runner query 'dpkg has openssl < 3.0.13' --fields os.version,dpkg:openssl\n",
    "  vogeler-runner count os.version               how many nodes run each version\n",
    "  vogeler-runner history web01 dpkg             how a plugin's value changed\n",
    "  vogeler-runner changes --since 6h -n 'web*'  what changed across the fleet\n",
    "  vogeler-runner keygen --out /etc/vogeler/keys  a key pair to sign commands with\n",
    "  vogeler-runner nodes forget web01             accept a reinstalled node's new key\n",
    "  vogeler-runner nodes pending                 keys waiting for approval\n",
    "  vogeler-runner nodes accept web04            pin web04's waiting key\n",
);

/// The expression language, for `query`'s and the top-level `--help`.
pub const EXPRESSION_HELP: &str = concat!(
    "Expressions (-n, query): names (web01, web01,web02), globs ('web*'), @file, - (stdin),\n",
    "comparisons on announced facts and stored plugin values by path, and packages:\n",
    "  os.family=Debian  kernel=~^6\\.  memory_mb>16000      announced facts (= != =~ !~ < <= > >=)\n",
    "  os_release.VERSION_ID = 12  facts.memory_mb < 4096   a plugin's value: PLUGIN.path\n",
    "  disks.filesystems[].avail < 1e9                     [] reads each element of a list\n",
    "  exists os_release.VERSION_ID                         the value is there\n",
    "  dpkg has openssl < 3.0.13                           a package, in dpkg's (rpms: rpm's) order\n",
    "  dpkg has name=nginx and version=~^1\\.22             conditions on one record\n",
    "  web* and not (os.family=RedHat or dpkg has nginx)   and, or, not, parentheses\n",
    "A bare path reads the node's announced facts when they have its first key, else the\n",
    "stored plugin values; '.kernel' reads only the kernel plugin's value. Quote values with\n",
    "spaces: os.name = 'Debian GNU/Linux'.\n",
);

/// `--output`, said once for every command (each subcommand's help adds its columns).
const OUTPUT_HELP: &str = concat!(
    "Output (--output, -o; the same for every command): table for people; json one document\n",
    "(the array of rows, or the one object asked for); jsonl one JSON object per row, a line\n",
    "each; yaml the json document; csv a header line and one line per row (nested values as\n",
    "compact JSON, quoted as RFC 4180 says). The data formats print only data on stdout,\n",
    "exact; notes go to stderr. A fan-out's json is its report (request, results by node,\n",
    "summary, --wait stored's check); its jsonl and csv rows come as replies arrive, then one\n",
    "for each node answered from a stored value (cached), silent (no_response), not reached\n",
    "(not_delivered) or whose reply did not verify (unverified).\n",
);

const EXIT_HELP: &str = concat!(
    "Exit codes: 0 every node answered ok; 1 a node failed or did not answer; 2 usage;\n",
    "69 broker or database unavailable; 78 bad configuration.\n",
);

/// The top-level `--help` after the flags: examples, output, exit codes.
fn long_help() -> String {
    format!(
        "{EXAMPLES}\n{EXPRESSION_HELP}\n{OUTPUT_HELP}{}\n{EXIT_HELP}",
        output::columns_help(crate::report::COLUMNS)
    )
}

/// Ask a set of nodes to run a plugin and show who answered, or ask the inventory in CouchDB.
/// Results go to stdout, logs to stderr.
#[derive(Debug, Parser)]
#[command(
    name = "vogeler-runner",
    version,
    args_override_self = true,
    subcommand_negates_reqs = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = long_help(),
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub couch: CouchArgs,

    /// Plugin to run on the nodes (as named in their plugin files)
    #[arg(short = 'c', long = "plugin", alias = "command", value_name = "PLUGIN", value_parser = PluginName::new_checked, required_unless_present_any = ["check_config", "print_config"])]
    pub plugin: Option<PluginName>,

    /// Nodes: all, a name, a list, a glob, @file, -, facts and stored values by path,
    /// packages (dpkg has openssl < 3.0.13), combined with and/or/not and parentheses (see
    /// the examples and expressions below)
    #[arg(
        short = 'n',
        long = "nodes",
        value_name = "NODES",
        default_value = "all",
        global = true
    )]
    pub nodes: String,

    /// How long to wait for replies, in seconds (10) or with a unit (500ms)
    /// [env: VOGELER_RUNNER__TIMEOUT] [default: 10]
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,

    /// Drop the command if it is not delivered within this, and let agents that come back
    /// later skip it [env: VOGELER_RUNNER__TTL] [default: 1h]
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,

    /// Run on at most this many nodes at a time: a number (5) or a percentage (20%); each
    /// batch is waited for (up to --timeout) before the next
    #[arg(long, value_name = "N|P%", value_parser = crate::BatchSize::parse)]
    pub batch: Option<crate::BatchSize>,

    /// Pause between batches, in seconds or with a unit [default: 0]
    #[arg(long, value_name = "DURATION", value_parser = vogeler_proto::duration::parse, requires = "batch")]
    pub batch_pause: Option<std::time::Duration>,

    /// Answer from values stored within this age (1h, 30m) and ask only the other nodes;
    /// stored answers are marked with their age
    /// ("fresh": values on their node's schedule and not overdue)
    #[arg(long, value_name = "MAXAGE|fresh", value_parser = crate::MaxAge::parse)]
    pub cached: Option<crate::MaxAge>,

    /// Return only once the server stored every answer shown (up to --timeout more), so
    /// views and documents read right after hold them; answers not stored by then are named
    /// and the exit status is 1
    #[arg(long, value_enum, value_name = "WHAT")]
    pub wait: Option<Wait>,

    /// How to print results, for every command alike (each command's --help names its
    /// csv columns)
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,

    /// Print values in full instead of a short summary
    #[arg(long, global = true)]
    pub full: bool,

    /// No progress bar on stderr (it is shown only when stderr is a terminal anyway)
    #[arg(long, global = true)]
    pub no_progress: bool,

    /// The private key commands are signed with (see `keygen`)
    /// [env: VOGELER_RUNNER__SIGNING_KEY] [default: /etc/vogeler/keys/runner.key]
    #[arg(long, value_name = "FILE", global = true)]
    pub signing_key: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `--output`: the same rule for every command, applied in one place ([`crate::output`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: aligned columns, values summarised (--full: whole), text from nodes
    /// escaped
    Table,
    /// One JSON document: the array of rows, or the one object asked for (a fan-out's
    /// report, a stored document)
    Json,
    /// One JSON object per row, one per line (a fan-out's as replies arrive)
    Jsonl,
    /// The json document, as YAML
    Yaml,
    /// A header line, then one line per row: the command's columns, nested values as compact
    /// JSON, quoted as RFC 4180 says (a fan-out's as replies arrive)
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Registered nodes (of -n, default all): last seen, agent version, stale flag
    #[command(after_long_help = output::columns_help(inv::NODE_COLUMNS))]
    Nodes {
        #[command(subcommand)]
        action: Option<NodesAction>,
    },
    /// Create a signing key pair: DIR/runner.key (mode 0600, keep it secret) and
    /// DIR/runner.pub (install it in each agent's authorized keys)
    #[command(after_long_help = output::columns_help(inv::KEYGEN_COLUMNS))]
    Keygen {
        /// Directory to write the two files to (created with mode 0700 if missing)
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Comment stored in runner.pub [default: user@host]
        #[arg(long)]
        comment: Option<String>,
    },
    /// A node's stored document, or one plugin's value
    #[command(after_long_help = concat!(
        "Output: table and json print the document or value as indented JSON (the table with\n",
        "node-supplied text escaped), yaml as YAML. jsonl and csv print it as rows: a list a\n",
        "row per entry (an object entry's keys are the columns, in the order first seen; any\n",
        "other entry is in a `value` column), an object a row per key (columns key, value),\n",
        "anything else one row (column value).\n\n",
        "Examples:\n",
        "  vogeler-runner show web01 dpkg -o csv        name,version: one line per package\n",
        "  vogeler-runner show web01 facts -o jsonl     {\"key\": ..., \"value\": ...} per fact\n",
    ))]
    Show {
        /// The node's name
        #[arg(value_parser = NodeName::new_checked)]
        node: NodeName,
        /// Only this plugin's value
        #[arg(value_parser = PluginName::new_checked)]
        plugin: Option<PluginName>,
    },
    /// Find nodes in the inventory (no fan-out): one node name per line
    #[command(after_long_help = output::columns_help(inv::FIND_COLUMNS))]
    Find {
        #[command(subcommand)]
        what: Find,
    },
    /// Nodes whose stored values meet an expression, with the values asked for: from the
    /// server's views in CouchDB (and `_find` for lists), no node is asked anything
    #[command(after_long_help = format!(
        "{}\n{}\n{}",
        concat!(
            "Examples:\n",
            "  vogeler-runner query 'dpkg has openssl < 3.0.13' --fields os.version,dpkg:openssl\n",
            "  vogeler-runner query 'os.family=Debian and memory_mb < 4096' --fields memory_mb\n",
            "  vogeler-runner query 'os_release.VERSION_ID = 12'\n",
            "  vogeler-runner query 'disks.filesystems[].avail < 1e9' --fields disks.filesystems[].target\n",
            "  vogeler-runner query 'rpms has (name = kernel and version < 5.14.0-400)'\n",
            "  vogeler-runner query 'web* and not dpkg has nginx' -o csv\n",
        ),
        EXPRESSION_HELP,
        output::columns_help(crate::ask::QUERY_COLUMNS),
    ))]
    Query {
        /// Which nodes: the expression language of -n (see below); `all` for every node
        #[arg(value_name = "EXPR")]
        expr: String,
        /// Values to show for each node, comma-separated: paths (os.version,
        /// disks.filesystems[].target) or a package's version (dpkg:openssl)
        #[arg(long, value_name = "FIELD,...", value_delimiter = ',', value_parser = crate::ask::parse_field)]
        fields: Vec<crate::ask::Field>,
    },
    /// How many nodes hold each value of a path (count os.version) or each version of a
    /// package (count dpkg:openssl), most common first: from the server's reduce views (the
    /// same counts Fauxton shows under _design/vogeler_inventory), or over the nodes of -n
    #[command(after_long_help = format!(
        "{}\n{}",
        concat!(
            "Examples:\n",
            "  vogeler-runner count os.version               every node, from the reduce view\n",
            "  vogeler-runner count dpkg:openssl             the version spread of a package\n",
            "  vogeler-runner count kernel -n 'web*'         only over these nodes\n",
            "  vogeler-runner count facts.cpus -n 'dpkg has nginx' -o json\n",
            "\n",
            "A path counts one plain value per node (text, number, true/false); `(none)` counts\n",
            "the nodes without one. A package counts installed records: a package installed for\n",
            "two architectures counts twice.\n",
        ),
        output::columns_help(crate::ask::COUNT_COLUMNS),
    ))]
    Count {
        /// A path (os.version, facts.memory_mb) or PLUGIN:PACKAGE (dpkg:openssl)
        #[arg(value_name = "PATH", value_parser = crate::ask::parse_field)]
        field: crate::ask::Field,
    },
    /// Show each recorded change of a plugin's value on a node, oldest first: packages by
    /// name (openssl 3.0.11-1 → 3.0.13-1, + added, - removed), objects by key path
    /// (os.version: 11 → 12), other lists by entry, anything else as old → new
    #[command(after_long_help = format!(
        "{}\n{}",
        concat!(
            "Examples:\n",
            "  vogeler-runner history web01 dpkg             package upgrades, installs, removals\n",
            "  vogeler-runner history web01 facts --full     every changed key, values uncut\n",
            "  vogeler-runner history web01 dpkg --output jsonl | jq .changed\n",
            "  vogeler-runner history web01 dpkg -o csv      one line per change\n",
        ),
        output::columns_help(inv::CHANGE_COLUMNS),
    ))]
    History {
        /// The node's name
        #[arg(value_parser = NodeName::new_checked)]
        node: NodeName,
        /// The plugin's name
        #[arg(value_parser = PluginName::new_checked)]
        plugin: PluginName,
    },
    /// What changed across the fleet, newest first, from the history the server records:
    /// one block per changed plugin value on a node, said as `history` says it. Filter with
    /// -n (any node set, as for a fan-out) and --plugin; no node is asked anything
    #[command(after_long_help = format!(
        "{}\n{}",
        concat!(
            "Examples:\n",
            "  vogeler-runner changes                        the last day, every node\n",
            "  vogeler-runner changes --since 2h -n 'web*'\n",
            "  vogeler-runner changes --since 7d --plugin dpkg --plugin rpms   package changes\n",
            "  vogeler-runner changes -n os.family=Debian --output jsonl | jq -c '{node, changed}'\n",
            "\n",
            "Output: the table shows blocks of at most 20 lines (--full shows all); the other\n",
            "formats a row per change, exact, and say on stderr when --limit cut the list. A\n",
            "row's kind (first, packages, object, list, value) says which fields it has: first\n",
            "items or value; packages and object changed, added, removed; list added, removed;\n",
            "value old, new.\n",
        ),
        output::columns_help(inv::CHANGE_COLUMNS),
    ))]
    Changes {
        /// How far back to look: 30m, 6h, 7d (a number alone is seconds)
        #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = vogeler_proto::duration::parse)]
        since: std::time::Duration,
        /// Only this plugin's changes (repeat for several)
        #[arg(short = 'c', long = "plugin", value_name = "PLUGIN", value_parser = PluginName::new_checked)]
        plugins: Vec<PluginName>,
        /// Show at most this many changes, the newest; says so when more exist (each change
        /// read holds two values of its plugin, up to megabytes for a package list)
        #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesAction {
    /// Forget a node's pinned key: the next key it signs with is pinned instead (after
    /// reinstalling a node, whose new agent has a new key), or with server.enrollment =
    /// "approve" waits for `nodes accept` again. Needs write access to the database
    #[command(after_long_help = output::columns_help(inv::FORGET_COLUMNS))]
    Forget {
        /// The node's name
        #[arg(value_parser = NodeName::new_checked)]
        node: NodeName,
    },
    /// Keys waiting for approval as a node (server.enrollment = "approve"): node, key id,
    /// first and last seen, agent version and announced facts. Compare the key id with
    /// `vogeler-agent key` on the node before accepting it
    #[command(after_long_help = output::columns_help(inv::PENDING_COLUMNS))]
    Pending,
    /// Accept the key waiting as NODE: it is pinned, and the node's document appears at once.
    /// Asks nothing. Needs write access to the database
    #[command(after_long_help = output::columns_help(inv::ACCEPT_COLUMNS))]
    Accept {
        /// The node's name
        #[arg(value_parser = NodeName::new_checked)]
        node: NodeName,
        /// When several keys claim the name: the id (or its first characters) of the one to
        /// accept; the others are rejected
        #[arg(long, value_name = "KEY_ID")]
        key: Option<String>,
    },
    /// Reject the key(s) waiting as NODE: their messages are never stored. Needs write
    /// access to the database
    #[command(after_long_help = output::columns_help(inv::REJECT_COLUMNS))]
    Reject {
        /// The node's name
        #[arg(value_parser = NodeName::new_checked)]
        node: NodeName,
        /// Only the key whose id starts with this [default: every waiting key]
        #[arg(long, value_name = "KEY_ID")]
        key: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Find {
    /// Nodes with an installed package (in dpkg, rpms or any plugin declared `packages`):
    /// NAME or NAME=VERSION
    #[command(after_long_help = output::columns_help(inv::FIND_COLUMNS))]
    Package {
        #[arg(value_name = "NAME[=VERSION]", value_parser = inv::parse_package)]
        spec: (String, Option<String>),
    },
    /// Nodes whose reported fact has a value: KEY=VALUE, e.g. os.family=Debian, kernel=6.1.0-18-amd64
    #[command(after_long_help = output::columns_help(inv::FIND_COLUMNS))]
    Fact {
        #[arg(value_name = "KEY=VALUE", value_parser = inv::parse_fact)]
        spec: (String, serde_json::Value),
    },
}

/// `--wait`: what to wait for after the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wait {
    /// The server has stored every answer in CouchDB.
    Stored,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command's `--help` says what its rows hold: the top level for a fan-out, each
    /// subcommand that prints something for itself.
    #[test]
    fn every_command_documents_its_output() {
        fn walk(cmd: &clap::Command, path: String, out: &mut Vec<(String, String)>) {
            let help = cmd
                .get_after_long_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            out.push((path.clone(), help));
            for sub in cmd.get_subcommands() {
                walk(sub, format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut helps = Vec::new();
        walk(&Cli::command(), "vogeler-runner".into(), &mut helps);
        let top = &helps[0].1;
        assert!(
            top.contains(&output::columns_help(crate::report::COLUMNS)),
            "{top}"
        );
        for name in ["table", "json", "jsonl", "yaml", "csv"] {
            assert!(top.contains(name), "{name} missing from:\n{top}");
        }
        for (path, help) in &helps[1..] {
            // `find` and `help` only hold subcommands.
            if path.ends_with(" find") || path.contains(" help") {
                continue;
            }
            assert!(
                help.contains("Columns (--output csv)") || help.contains("jsonl and csv"),
                "`{path} --help` does not say what it prints:\n{help}"
            );
        }
    }
}
