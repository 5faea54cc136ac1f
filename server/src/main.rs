//! `vogeler-server`: parse flags, load config, start logging, run the server.

use std::process::ExitCode;

use clap::Parser;
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
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    couch: CouchArgs,

    /// Unacknowledged results the broker may hand over at once [env: VOGELER_SERVER__PREFETCH] [default: 64]
    #[arg(long, value_name = "N")]
    prefetch: Option<u16>,

    /// Validate the configuration, print the problems, and exit (0 valid, 78 invalid)
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut sources = cli.common.sources();
    cli.couch.add_to(&mut sources);
    sources.set("server.prefetch", cli.prefetch);
    let settings = match config::load(&sources).and_then(|raw| raw.server()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vogeler-server: {e}");
            return exit::code(exit::CONFIG);
        }
    };
    if cli.check_config {
        println!("vogeler-server: configuration is valid");
        return exit::code(exit::OK);
    }
    telemetry::init(&settings.log_level);
    exit::block_on("vogeler-server", async {
        match vogeler_server::run(settings, shutdown::on_signals()).await {
            Ok(()) => exit::code(exit::OK),
            Err(e) => {
                tracing::error!(error = %e, "server stopped");
                eprintln!("vogeler-server: {e}");
                exit::code(if e.is_unavailable() {
                    exit::UNAVAILABLE
                } else {
                    exit::FAILURE
                })
            }
        }
    })
}
