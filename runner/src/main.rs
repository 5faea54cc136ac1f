//! `vogeler-runner`: parse flags, load config, run one query or inventory question, print.

use std::{io::Write as _, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use vogeler_core::{
    cli::{CommonArgs, CouchArgs},
    config, exit,
    names::PluginName,
    shutdown, telemetry,
};
use vogeler_runner::{Query, RunnerError, inventory as inv, target};

/// Ask a set of nodes to run a plugin and show who answered, or ask the inventory in CouchDB.
/// Results go to stdout, logs to stderr.
#[derive(Debug, Parser)]
#[command(
    name = "vogeler-runner",
    version,
    args_override_self = true,
    subcommand_negates_reqs = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = concat!(
        "Examples:\n",
        "  vogeler-runner -c rpms -n all                every registered node\n",
        "  vogeler-runner -c facts -n web01 --timeout 3\n",
        "  vogeler-runner -c dpkg -n 'web01,web02'\n",
        "  vogeler-runner -c dpkg -n 'web*'             globs: 'db-[0-9]*'\n",
        "  vogeler-runner -c dpkg -n @nodes.txt         names from a file; '-' reads stdin\n",
        "  vogeler-runner -c dpkg -n os.family=Debian   facts: = != =~ (regex) > < >= <=\n",
        "  vogeler-runner -c dpkg -n 'kernel=~^6\\.'  'memory_mb>16000'\n",
        "  vogeler-runner -c dpkg -n 'web* and not (os.family=RedHat or cpus<4)'\n",
        "  vogeler-runner -c hello -n all --output jsonl | jq .\n",
        "  vogeler-runner -c rpms -n all --cached 1h      stored values up to 1h old, ask the rest\n",
        "  vogeler-runner -c upgrade_check -n 'web*' --batch 25% --batch-pause 30s\n",
        "  vogeler-runner nodes -n 'db*'                registered nodes, last seen, stale\n",
        "  vogeler-runner show web01 dpkg               a stored document or value\n",
        "  vogeler-runner find package openssl=3.0.11-1  nodes with that package (from CouchDB)\n",
        "  vogeler-runner find fact os.family=Debian\n",
        "  vogeler-runner history web01 dpkg             how a plugin's value changed\n",
        "  vogeler-runner keygen --out /etc/vogeler/keys  a key pair to sign commands with\n",
        "  vogeler-runner nodes forget web01             accept a reinstalled node's new key\n\n",
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
    #[arg(short = 'c', long = "command", value_name = "PLUGIN", value_parser = PluginName::new_checked, required_unless_present_any = ["check_config", "print_config"])]
    plugin: Option<PluginName>,

    /// Nodes: all, a name, a list, a glob, @file, -, fact filters, combined with and/or/not
    /// and parentheses (see the examples below)
    #[arg(
        short = 'n',
        long = "nodes",
        value_name = "NODES",
        default_value = "all",
        global = true
    )]
    nodes: String,

    /// How long to wait for replies, in seconds (10) or with a unit (500ms)
    /// [env: VOGELER_RUNNER__TIMEOUT] [default: 10]
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,

    /// Drop the command if it is not delivered within this, and let agents that come back
    /// later skip it [env: VOGELER_RUNNER__TTL] [default: 1h]
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,

    /// Run on at most this many nodes at a time: a number (5) or a percentage (20%); each
    /// batch is waited for (up to --timeout) before the next
    #[arg(long, value_name = "N|P%", value_parser = vogeler_runner::BatchSize::parse)]
    batch: Option<vogeler_runner::BatchSize>,

    /// Pause between batches, in seconds or with a unit [default: 0]
    #[arg(long, value_name = "DURATION", value_parser = vogeler_core::duration::parse, requires = "batch")]
    batch_pause: Option<std::time::Duration>,

    /// Answer from values stored within this age (1h, 30m) and ask only the other nodes;
    /// stored answers are marked with their age
    #[arg(long, value_name = "MAXAGE", value_parser = vogeler_core::duration::parse)]
    cached: Option<std::time::Duration>,

    /// Output: table (default), json (one document), jsonl (one line per node as replies
    /// arrive), yaml
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,

    /// Print values in full instead of a short summary
    #[arg(long, global = true)]
    full: bool,

    /// No progress bar on stderr (it is shown only when stderr is a terminal anyway)
    #[arg(long, global = true)]
    no_progress: bool,

    /// The private key commands are signed with (see `keygen`)
    /// [env: VOGELER_RUNNER__SIGNING_KEY] [default: /etc/vogeler/keys/runner.key]
    #[arg(long, value_name = "FILE", global = true)]
    signing_key: Option<std::path::PathBuf>,

    #[command(flatten)]
    config: vogeler_core::cli::ConfigArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Jsonl,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Registered nodes (of -n, default all): last seen, agent version, stale flag
    Nodes {
        #[command(subcommand)]
        action: Option<NodesAction>,
    },
    /// Create a signing key pair: DIR/runner.key (mode 0600, keep it secret) and
    /// DIR/runner.pub (install it in each agent's authorized keys)
    Keygen {
        /// Directory to write the two files to (created with mode 0700 if missing)
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Comment stored in runner.pub [default: user@host]
        #[arg(long)]
        comment: Option<String>,
    },
    /// A node's stored document, or one plugin's value
    Show {
        /// The node's name
        node: String,
        /// Only this plugin's value
        plugin: Option<String>,
    },
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
enum NodesAction {
    /// Forget a node's pinned key: the next key it signs with is pinned instead (after
    /// reinstalling a node, whose new agent has a new key). Needs write access to the database
    Forget {
        /// The node's name
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum Find {
    /// Nodes with an installed package (from the dpkg and rpms plugins): NAME or NAME=VERSION
    Package {
        #[arg(value_name = "NAME[=VERSION]", value_parser = inv::parse_package)]
        spec: (String, Option<String>),
    },
    /// Nodes whose reported fact has a value: KEY=VALUE, e.g. os.family=Debian, kernel=6.1.0-18-amd64
    Fact {
        #[arg(value_name = "KEY=VALUE", value_parser = inv::parse_fact)]
        spec: (String, serde_json::Value),
    },
}

fn fail(e: RunnerError) -> ExitCode {
    eprintln!("vogeler-runner: {e}");
    exit::code(if e.is_unavailable() {
        exit::UNAVAILABLE
    } else if e.is_config() {
        exit::CONFIG
    } else {
        exit::FAILURE
    })
}

fn keygen(dir: &std::path::Path, comment: Option<&str>) -> ExitCode {
    let default_comment = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "runner".into()),
        vogeler_core::hostname().unwrap_or_else(|| "localhost".into())
    );
    match inv::keygen(dir, comment.unwrap_or(&default_comment)) {
        Ok((private, public, id)) => {
            println!(
                "created key {id}:\n  {}  (private: keep it on this machine, mode 0600)\n  {}  (public: install it in each agent's authorized keys)",
                private.display(),
                public.display()
            );
            println!(
                "sign with it: --signing-key {} (or runner.signing_key in the config file)",
                private.display()
            );
            exit::code(exit::OK)
        }
        Err(e) => {
            eprintln!("vogeler-runner: keygen: {e}");
            exit::code(exit::CONFIG)
        }
    }
}

fn print_doc(output: Output, v: &serde_json::Value) {
    match output {
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(v).unwrap_or_default()),
        Output::Jsonl => println!("{v}"),
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

async fn inventory(
    settings: &vogeler_core::config::RunnerSettings,
    cli: &Cli,
    command: &Command,
) -> ExitCode {
    let lines = |names: Vec<String>| {
        names
            .into_iter()
            .map(|n| format!("{n}\n"))
            .collect::<String>()
    };
    let result = match command {
        Command::Find {
            what: Find::Package {
                spec: (name, version),
            },
        } => inv::find_package(&settings.couch, name, version.as_deref())
            .await
            .map(lines),
        Command::Find {
            what: Find::Fact { spec: (key, value) },
        } => inv::find_fact(&settings.couch, key, value).await.map(lines),
        Command::History { node, plugin } => inv::history(&settings.couch, node, plugin)
            .await
            .map(|h| inv::render_history(&h)),
        Command::Keygen { .. } => unreachable!("keygen runs before configuration is loaded"),
        Command::Nodes {
            action: Some(NodesAction::Forget { node }),
        } => match inv::forget(&settings.couch, node).await {
            Ok(Some(old)) => Ok(format!(
                "node {node}: forgot pinned key {old}; the next key it signs with will be pinned\n"
            )),
            Ok(None) => Ok(format!("node {node}: no key was pinned\n")),
            Err(e) => Err(e),
        },
        Command::Nodes { action: None } => {
            let set = match target::parse(&cli.nodes, &target::Files) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("vogeler-runner: -n: {e}");
                    return exit::code(exit::USAGE);
                }
            };
            match inv::nodes(&settings.couch, &set, settings.freshness).await {
                Ok(nodes) if cli.output == Output::Table => Ok(inv::render_nodes(&nodes)),
                Ok(nodes) => {
                    print_doc(
                        cli.output,
                        &serde_json::to_value(&nodes).unwrap_or_default(),
                    );
                    return exit::code(exit::OK);
                }
                Err(e) => Err(e),
            }
        }
        Command::Show { node, plugin } => {
            match inv::show(&settings.couch, node, plugin.as_deref()).await {
                Ok(Some(v)) => {
                    print_doc(
                        if cli.output == Output::Table {
                            Output::Json
                        } else {
                            cli.output
                        },
                        &v,
                    );
                    return exit::code(exit::OK);
                }
                Ok(None) => {
                    eprintln!(
                        "vogeler-runner: no stored {} for node {node}",
                        plugin.as_deref().unwrap_or("document")
                    );
                    return exit::code(exit::FAILURE);
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(text) => {
            print!("{text}");
            exit::code(exit::OK)
        }
        Err(e) => fail(e),
    }
}

/// Answered / expected and time elapsed, on stderr, only when stderr is a terminal.
fn progress_bar(disabled: bool, expected: usize) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if disabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let (bar, template) = if expected > 0 {
        (
            indicatif::ProgressBar::new(expected as u64),
            "{bar:30} {pos}/{len} answered, {elapsed}",
        )
    } else {
        (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {pos} answered, {elapsed}",
        )
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(bar)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keygen { out, comment }) = &cli.command {
        return keygen(out, comment.as_deref());
    }
    let mut sources = cli.common.sources();
    cli.couch.add_to(&mut sources);
    sources
        .set("runner.timeout", cli.timeout.as_ref())
        .set("runner.ttl", cli.ttl.as_ref())
        .set(
            "runner.signing_key",
            cli.signing_key.as_ref().map(|p| p.display()),
        );
    let loaded = config::load(&sources).and_then(|raw| raw.runner());
    let settings = match vogeler_core::cli::settings_or_exit("vogeler-runner", loaded, &cli.config)
    {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(&settings.log_level);
    tracing::info!(settings = ?settings, "configuration (secrets redacted)");
    if let Some(command) = &cli.command {
        return exit::block_on("vogeler-runner", inventory(&settings, &cli, command));
    }
    let Some(plugin) = cli.plugin.clone() else {
        unreachable!("clap requires -c without a subcommand")
    };
    let nodes = match target::parse(&cli.nodes, &target::Files) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vogeler-runner: -n: {e}");
            return exit::code(exit::USAGE);
        }
    };
    let query = Query {
        plugin,
        nodes,
        nodes_text: cli.nodes.clone(),
        timeout: settings.timeout,
        ttl: settings.ttl,
        cached: cli.cached,
        batch: cli.batch.map(|size| vogeler_runner::Batch {
            size,
            pause: cli.batch_pause.unwrap_or_default(),
        }),
    };
    let (output, full) = (cli.output, cli.full);
    let no_progress = cli.no_progress;
    exit::block_on("vogeler-runner", async move {
        let mut bar: Option<indicatif::ProgressBar> = None;
        let mut stream = |event: vogeler_runner::Progress<'_>| {
            let r = match event {
                vogeler_runner::Progress::Sent { expected } => {
                    bar = progress_bar(no_progress, expected);
                    return;
                }
                vogeler_runner::Progress::Reply(r) => r,
            };
            if let Some(b) = &bar {
                b.inc(1);
            }
            if output == Output::Jsonl {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", vogeler_runner::report::reply_json(r, full));
                let _ = out.flush();
            }
        };
        let result =
            vogeler_runner::query(&settings, &query, &shutdown::on_signals(), &mut stream).await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        match result {
            Ok(report) => {
                match output {
                    Output::Table => print!("{}", report.render_table_with(full)),
                    Output::Jsonl => report.missing_lines().iter().for_each(|l| println!("{l}")),
                    Output::Json | Output::Yaml => print_doc(output, &report.to_json(full)),
                }
                exit::code(if report.success() {
                    exit::OK
                } else {
                    exit::FAILURE
                })
            }
            Err(e) => fail(e),
        }
    })
}
