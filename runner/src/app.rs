//! What `vogeler-runner` does with a parsed command line and loaded settings: one fan-out
//! (with progress and streaming output) or one question to the inventory, printed. Returns
//! the exit code; `main` only parses, loads and reports.

use std::io::Write as _;

use vogeler_config::RunnerSettings;
use vogeler_core::{exit, shutdown};

use crate::{
    Batch, Progress, Query, RunnerError,
    cli::{Cli, Command, Find, NodesAction, Output},
    inventory as inv, report, target,
};

/// Run what the command line asks for.
pub async fn run(settings: RunnerSettings, cli: Cli) -> Result<u8, RunnerError> {
    match &cli.command {
        Some(command) => inventory(&settings, &cli, command).await,
        None => fan_out(&settings, &cli).await,
    }
}

fn node_set(cli: &Cli) -> Result<target::NodeSet, RunnerError> {
    target::parse(&cli.nodes, &target::Files).map_err(|e| RunnerError::Usage(format!("-n: {e}")))
}

fn print_doc(output: Output, v: &serde_json::Value) {
    match output {
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(v).unwrap_or_default()),
        Output::Jsonl => println!("{v}"),
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

/// Rows as one document (json, yaml) or one line each (jsonl).
fn print_rows(output: Output, rows: &[serde_json::Value]) {
    match output {
        Output::Jsonl => rows.iter().for_each(|r| println!("{r}")),
        _ => print_doc(output, &serde_json::Value::Array(rows.to_vec())),
    }
}

fn to_rows(changes: &[crate::diff::Change]) -> Vec<serde_json::Value> {
    changes
        .iter()
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .collect()
}

fn lines(names: Vec<String>) -> String {
    names.into_iter().map(|n| format!("{n}\n")).collect()
}

/// Questions answered from the inventory, without fan-out.
async fn inventory(
    settings: &RunnerSettings,
    cli: &Cli,
    command: &Command,
) -> Result<u8, RunnerError> {
    let text = match command {
        Command::Find {
            what: Find::Package {
                spec: (name, version),
            },
        } => lines(inv::find_package(&settings.couch, name, version.as_deref()).await?),
        Command::Find {
            what: Find::Fact { spec: (key, value) },
        } => lines(inv::find_fact(&settings.couch, key, value).await?),
        Command::History { node, plugin } => {
            let changes = inv::history_changes(&inv::history(&settings.couch, node, plugin).await?);
            if cli.output != Output::Table {
                print_rows(cli.output, &to_rows(&changes));
                return Ok(exit::OK);
            }
            inv::render_history(&changes, cli.full)
        }
        Command::Changes {
            since,
            plugins,
            limit,
        } => {
            let query = inv::ChangesQuery {
                since: *since,
                plugins: plugins.clone(),
                limit: *limit as usize,
            };
            let set = node_set(cli)?;
            let changes = inv::changes(&settings.couch, &set, settings.freshness, &query).await?;
            if cli.output != Output::Table {
                print_rows(cli.output, &to_rows(&changes.changes));
                // On stderr, so the JSON stays one document of changes only.
                if changes.more {
                    eprintln!("vogeler-runner: {}", inv::more_note(changes.changes.len()));
                }
                return Ok(exit::OK);
            }
            inv::render_changes(&changes, cli.full)
        }
        Command::Keygen { .. } => unreachable!("keygen runs before configuration is loaded"),
        Command::Nodes {
            action: Some(NodesAction::Forget { node }),
        } => match inv::forget(&settings.couch, node).await? {
            Some(old) => format!(
                "node {node}: forgot pinned key {old}; the next key it signs with will be pinned\n"
            ),
            None => format!("node {node}: no key was pinned\n"),
        },
        Command::Nodes {
            action: Some(NodesAction::Pending),
        } => {
            let pending = inv::pending(&settings.couch).await?;
            if cli.output != Output::Table {
                let rows: Vec<serde_json::Value> = pending
                    .iter()
                    .map(|(node, p)| {
                        let mut row = serde_json::to_value(p).unwrap_or_default();
                        row["node"] = node.as_str().into();
                        row
                    })
                    .collect();
                print_rows(cli.output, &rows);
                return Ok(exit::OK);
            }
            inv::render_pending(&pending)
        }
        Command::Nodes {
            action: Some(NodesAction::Accept { node, key }),
        } => {
            let a = inv::accept(&settings.couch, node, key.as_deref()).await?;
            if cli.output != Output::Table {
                print_doc(cli.output, &serde_json::to_value(&a).unwrap_or_default());
                return Ok(exit::OK);
            }
            format!(
                "node {}: accepted key {} (first seen {}, last seen {}); its document is in database {}\n",
                a.node,
                a.key_id,
                inv::time(a.first_seen),
                inv::time(a.last_seen),
                settings.couch.database
            )
        }
        Command::Nodes {
            action: Some(NodesAction::Reject { node, key }),
        } => {
            let keys = inv::reject(&settings.couch, node, key.as_deref()).await?;
            format!(
                "node {node}: rejected key {}; messages signed with it are not stored\n",
                keys.join(", ")
            )
        }
        Command::Nodes { action: None } => {
            let set = node_set(cli)?;
            let nodes = inv::nodes(&settings.couch, &set, settings.freshness).await?;
            if cli.output != Output::Table {
                print_doc(
                    cli.output,
                    &serde_json::to_value(&nodes).unwrap_or_default(),
                );
                return Ok(exit::OK);
            }
            inv::render_nodes(&nodes)
        }
        Command::Show { node, plugin } => {
            match inv::show(&settings.couch, node, plugin.as_ref()).await? {
                Some(v) => {
                    let output = match cli.output {
                        Output::Table => Output::Json,
                        other => other,
                    };
                    print_doc(output, &v);
                    return Ok(exit::OK);
                }
                None => {
                    eprintln!(
                        "vogeler-runner: no stored {} for node {node}",
                        plugin.as_ref().map_or("document", |p| p.as_str())
                    );
                    return Ok(exit::FAILURE);
                }
            }
        }
    };
    print!("{text}");
    Ok(exit::OK)
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

/// Ask the nodes and show who answered: 0 when every expected node answered well, else 1.
async fn fan_out(settings: &RunnerSettings, cli: &Cli) -> Result<u8, RunnerError> {
    let Some(plugin) = cli.plugin.clone() else {
        unreachable!("clap requires -c without a subcommand")
    };
    let query = Query {
        plugin,
        nodes: node_set(cli)?,
        nodes_text: cli.nodes.clone(),
        timeout: settings.timeout,
        ttl: settings.ttl,
        cached: cli.cached,
        batch: cli.batch.map(|size| Batch {
            size,
            pause: cli.batch_pause.unwrap_or_default(),
        }),
    };
    let (output, full, no_progress) = (cli.output, cli.full, cli.no_progress);
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut stream = |event: Progress<'_>| {
        let r = match event {
            Progress::Sent { expected } => {
                bar = progress_bar(no_progress, expected);
                return;
            }
            Progress::Reply(r) => r,
        };
        if let Some(b) = &bar {
            b.inc(1);
        }
        if output == Output::Jsonl {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", report::reply_json(r, full));
            let _ = out.flush();
        }
    };
    let result = crate::query(settings, &query, &shutdown::on_signals(), &mut stream).await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = result?;
    let stored = match cli.wait {
        Some(crate::cli::Wait::Stored) => Some(
            crate::wait_stored(&settings.couch, &query.plugin, &report, settings.timeout).await?,
        ),
        None => None,
    };
    match output {
        Output::Table => {
            print!("{}", report.render_table_with(full));
            if let Some(s) = &stored {
                println!("{}", render_stored(s));
            }
        }
        Output::Jsonl => {
            report.missing_lines().iter().for_each(|l| println!("{l}"));
            if let Some(s) = &stored {
                println!("{}", serde_json::json!({ "stored": s }));
            }
        }
        Output::Json | Output::Yaml => {
            let mut doc = report.to_json(full);
            if let Some(s) = &stored {
                doc["stored"] = serde_json::json!(s);
            }
            print_doc(output, &doc)
        }
    }
    if stored.as_ref().is_some_and(|s| !s.all_stored()) {
        return Ok(exit::FAILURE);
    }
    Ok(if report.success() {
        exit::OK
    } else {
        exit::FAILURE
    })
}

/// The `--wait stored` line under the table.
fn render_stored(s: &crate::StoredCheck) -> String {
    let secs = s.waited_ms as f64 / 1000.0;
    if s.all_stored() {
        format!(
            "stored: all {} answers are in CouchDB ({secs:.1} s after the last)",
            s.stored
        )
    } else {
        format!(
            "stored: {} of {} answers; not stored within {secs:.1} s: {} (see vogeler-server's log and the dead letters)",
            s.stored,
            s.stored + s.waiting.len(),
            s.waiting.join(", ")
        )
    }
}
