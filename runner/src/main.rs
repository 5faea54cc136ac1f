//! `vogeler-runner`: parse flags, load config, run one query or inventory question, print.

use std::{io::Write as _, process::ExitCode};

use clap::Parser;
use vogeler_core::{config, exit, shutdown, telemetry};
use vogeler_runner::{
    Query, RunnerError,
    cli::{Cli, Command, Find, NodesAction, Output},
    inventory as inv, target,
};

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
