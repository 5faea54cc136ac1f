//! `vogeler-server`: parse flags, load config, start logging, run the server.

use std::process::ExitCode;

use clap::Parser;
use vogeler_core::{config, exit, shutdown, telemetry};
use vogeler_server::cli::{Cli, Command};

/// glibc's malloc was over a third of the server's CPU while storing large results (every
/// plugin value is a tree of small allocations); mimalloc halves that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn prune(
    settings: &vogeler_core::config::ServerSettings,
    older_than: std::time::Duration,
    dry_run: bool,
) -> ExitCode {
    let cancel = tokio_util::sync::CancellationToken::new();
    let couch = match vogeler_server::connect_database(&settings.couch, &cancel).await {
        Ok(Some(c)) => c,
        Ok(None) => return exit::code(exit::FAILURE),
        Err(e) => {
            eprintln!("vogeler-server: {e}");
            return exit::code(if e.is_config() {
                exit::CONFIG
            } else {
                exit::UNAVAILABLE
            });
        }
    };
    let inventory = vogeler_core::query::Inventory::new(couch, &settings.couch.database);
    let result = if dry_run {
        vogeler_server::maintenance::stale_nodes(&inventory, older_than).await
    } else {
        vogeler_server::maintenance::prune(&inventory, older_than).await
    };
    match result {
        Ok(nodes) => {
            for n in &nodes {
                println!("{n}");
            }
            let verb = if dry_run { "would prune" } else { "pruned" };
            eprintln!(
                "vogeler-server: {verb} {} node(s) not seen for {}",
                nodes.len(),
                vogeler_core::duration::format(older_than)
            );
            exit::code(exit::OK)
        }
        Err(e) => {
            eprintln!("vogeler-server: {e}");
            exit::code(if e.is_transient() {
                exit::UNAVAILABLE
            } else if e.is_denied() {
                exit::CONFIG
            } else {
                exit::FAILURE
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = cli.common.sources();
    cli.couch.add_to(&mut sources);
    sources
        .set("server.http_listen", cli.http_listen.as_ref())
        .set("server.prefetch", cli.prefetch)
        .set("server.batch_size", cli.batch_size);
    let loaded = config::load(&sources).and_then(|raw| raw.server());
    let settings = match vogeler_core::cli::settings_or_exit("vogeler-server", loaded, &cli.config)
    {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(&settings.log_level);
    tracing::info!(settings = ?settings, "configuration (secrets redacted)");
    if let Some(Command::Prune {
        older_than,
        dry_run,
    }) = cli.command
    {
        return exit::block_on("vogeler-server", prune(&settings, older_than, dry_run));
    }
    exit::block_on("vogeler-server", async {
        match vogeler_server::run(settings, shutdown::on_signals()).await {
            Ok(()) => exit::code(exit::OK),
            Err(e) => {
                tracing::error!(error = %e, "server stopped");
                eprintln!("vogeler-server: {e}");
                exit::code(if e.is_config() {
                    exit::CONFIG
                } else if e.is_unavailable() {
                    exit::UNAVAILABLE
                } else {
                    exit::FAILURE
                })
            }
        }
    })
}
