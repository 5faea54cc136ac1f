//! `vogeler-server`: parse flags, load config, start logging, run the server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vogeler_core::{
    cli::{CommonArgs, CouchArgs},
    config, exit, shutdown, telemetry,
};

/// Drain agents' results from the broker into CouchDB: one document per node (`_id` = node
/// name), each plugin's value under a key named after the plugin. Creates the database if
/// it is missing.
#[derive(Debug, Parser)]
#[command(
    name = "vogeler-server",
    version,
    args_override_self = true,
    after_help = vogeler_core::cli::ENV_HELP,
    after_long_help = concat!(
        "Example:\n  vogeler-server --couchdb-url http://127.0.0.1:5984 --database system_records\n\n",
        "Credentials: VOGELER_COUCHDB__USERNAME and VOGELER_COUCHDB__PASSWORD (or couchdb.password_file\n",
        "in the config file). Without them requests are sent unauthenticated.\n",
    ),
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    couch: CouchArgs,

    /// Unacknowledged results the broker may hand over at once [env: VOGELER_SERVER__PREFETCH] [default: 512]
    #[arg(long, value_name = "N")]
    prefetch: Option<u16>,

    /// Results written to CouchDB in one request at most [env: VOGELER_SERVER__BATCH_SIZE] [default: 256]
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,

    /// Serve /healthz and /metrics (Prometheus) on this local address, e.g. 127.0.0.1:9187
    /// [env: VOGELER_SERVER__HTTP_LISTEN] [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    http_listen: Option<String>,

    #[command(flatten)]
    config: vogeler_core::cli::ConfigArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Delete the documents of nodes not seen for a while (stale nodes are only reported
    /// otherwise), e.g. `vogeler-server prune --older-than 30d`
    Prune {
        /// Delete nodes whose last sign of life is older than this (30d, 12h, ...)
        #[arg(long, value_name = "AGE", value_parser = vogeler_core::duration::parse)]
        older_than: std::time::Duration,
        /// Only list the nodes that would be deleted
        #[arg(long)]
        dry_run: bool,
    },
}

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
            return exit::code(exit::UNAVAILABLE);
        }
    };
    let db = &settings.couch.database;
    let result = if dry_run {
        vogeler_server::maintenance::stale_nodes(&couch, db, older_than).await
    } else {
        vogeler_server::maintenance::prune(&couch, db, older_than).await
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
