//! What `vogeler-runner` does with a parsed command line and loaded settings: one fan-out
//! (with progress and streaming output) or one question to the inventory, printed. Returns
//! the exit code; `main` only parses, loads and reports.

use std::io::Write as _;

use vogeler_config::RunnerSettings;
use vogeler_core::{exit, shutdown};

use crate::{
    Batch, Progress, Query, RunnerError,
    cli::{Cli, Command, Find, NodesAction},
    inventory as inv,
    output::{self, Rows},
    report, target,
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

/// Data on stdout, notes on stderr. A reader that went away (`| head`) is not an error:
/// `print!` would panic on the closed pipe.
pub fn print(printed: output::Printed) {
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_all(printed.stdout.as_bytes())
        .and_then(|()| out.flush());
    let _ = std::io::stderr()
        .lock()
        .write_all(printed.stderr.as_bytes());
}

/// Questions answered from the inventory, without fan-out.
async fn inventory(
    settings: &RunnerSettings,
    cli: &Cli,
    command: &Command,
) -> Result<u8, RunnerError> {
    let couch = &settings.couch;
    let rows = match command {
        Command::Find {
            what: Find::Package {
                spec: (name, version),
            },
        } => inv::find_rows(&inv::find_package(couch, name, version.as_deref()).await?),
        Command::Find {
            what: Find::Fact { spec: (key, value) },
        } => inv::find_rows(&inv::find_fact(couch, key, value).await?),
        Command::History { node, plugin } => {
            let changes = inv::history_changes(&inv::history(couch, node, plugin).await?);
            inv::history_rows(&changes, cli.full)
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
            let changes = inv::changes(couch, &set, settings.freshness, &query).await?;
            inv::changes_rows(&changes, cli.full)
        }
        Command::Query { expr, fields } => {
            let set = target::parse(expr, &target::Files)
                .map_err(|e| RunnerError::Usage(format!("query: {e}")))?;
            crate::ask::query_rows(
                &crate::ask::query(couch, &set, fields, settings.freshness).await?,
            )
        }
        Command::Count { field } => {
            let set = node_set(cli)?;
            crate::ask::count_rows(
                &crate::ask::count(couch, field, &set, settings.freshness).await?,
            )
        }
        Command::Keygen { .. } => unreachable!("keygen runs before configuration is loaded"),
        Command::Nodes {
            action: Some(NodesAction::Forget { node }),
        } => inv::forget_rows(node, inv::forget(couch, node).await?.as_deref()),
        Command::Nodes {
            action: Some(NodesAction::Pending),
        } => inv::pending_rows(&inv::pending(couch).await?),
        Command::Nodes {
            action: Some(NodesAction::Accept { node, key }),
        } => inv::accept_rows(
            &inv::accept(couch, node, key.as_deref()).await?,
            &couch.database,
        ),
        Command::Nodes {
            action: Some(NodesAction::Reject { node, key }),
        } => inv::reject_rows(node, &inv::reject(couch, node, key.as_deref()).await?),
        Command::Nodes { action: None } => {
            let set = node_set(cli)?;
            inv::nodes_rows(&inv::nodes(couch, &set, settings.freshness).await?)
        }
        Command::Show { node, plugin } => match inv::show(couch, node, plugin.as_ref()).await? {
            Some(v) => inv::show_rows(&v),
            None => {
                eprintln!(
                    "vogeler-runner: no stored {} for node {node}",
                    plugin.as_ref().map_or("document", |p| p.as_str())
                );
                return Ok(exit::FAILURE);
            }
        },
    };
    print(rows.render(cli.output));
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
    let mut lines = output::Stream::new(
        output,
        report::COLUMNS.iter().map(|c| c.to_string()).collect(),
    );
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
        let line = lines.row(&report::reply_json(r, full));
        if !line.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
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
    let mut table = report.render_table_with(full);
    let mut doc = report.to_json(full);
    if let Some(s) = &stored {
        table.push_str(&render_stored(s));
        table.push('\n');
        doc["stored"] = serde_json::json!(s);
    }
    let mut rest = Rows::list(report::COLUMNS, report.rest_rows(full), table).with_document(doc);
    if let Some(s) = &stored {
        rest = rest.with_note(render_stored(s));
    }
    print(lines.finish(&rest));
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
