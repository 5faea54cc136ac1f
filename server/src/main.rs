//! `vogeler-server`: parse flags, load config, start logging, run the server.

use std::process::ExitCode;

use clap::Parser;
use vogeler_config as config;
use vogeler_core::{exit, shutdown, telemetry};
use vogeler_server::{
    ServerError,
    cli::{Cli, Command},
};

const PROGRAM: &str = "vogeler-server";

/// glibc's malloc was over a third of the server's CPU while storing large results (every
/// plugin value is a tree of small allocations); mimalloc halves that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn prune(
    settings: &vogeler_config::ServerSettings,
    older_than: std::time::Duration,
    dry_run: bool,
) -> Result<u8, ServerError> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let Some(couch) = vogeler_server::connect_database(&settings.couch, &cancel).await? else {
        return Ok(exit::FAILURE);
    };
    let db = &settings.couch.database;
    let inventory = vogeler_core::query::Inventory::new(couch, db);
    let result = if dry_run {
        vogeler_server::maintenance::stale_nodes(&inventory, older_than).await
    } else {
        vogeler_server::maintenance::prune(&inventory, older_than).await
    };
    let nodes = result.map_err(|source| ServerError::Database {
        db: db.clone(),
        source,
    })?;
    for n in &nodes {
        println!("{n}");
    }
    let verb = if dry_run { "would prune" } else { "pruned" };
    eprintln!(
        "vogeler-server: {verb} {} node(s) not seen for {}",
        nodes.len(),
        vogeler_proto::duration::format(older_than)
    );
    Ok(exit::OK)
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
    let settings = match vogeler_core::cli::settings_or_exit(PROGRAM, loaded, &cli.config) {
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
        return vogeler_core::cli::start(PROGRAM, prune(&settings, older_than, dry_run));
    }
    vogeler_core::cli::start(PROGRAM, async {
        vogeler_server::run(settings, shutdown::on_signals())
            .await
            .map(|()| exit::OK)
    })
}
