//! `vogeler-server`'s command line, in the library so that man pages and shell completions
//! are generated from the same definitions (see `dist/`).

use clap::{Parser, Subcommand};
use vogeler_core::cli::{CommonArgs, ConfigArgs, CouchArgs};

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub couch: CouchArgs,

    /// Unacknowledged results the broker may hand over at once [env: VOGELER_SERVER__PREFETCH] [default: 512]
    #[arg(long, value_name = "N")]
    pub prefetch: Option<u16>,

    /// Results written to CouchDB in one request at most [env: VOGELER_SERVER__BATCH_SIZE] [default: 256]
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,

    /// Serve /healthz and /metrics (Prometheus) on this local address, e.g. 127.0.0.1:9187
    /// [env: VOGELER_SERVER__HTTP_LISTEN] [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub http_listen: Option<String>,

    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Delete the documents of nodes not seen for a while (stale nodes are only reported
    /// otherwise), e.g. `vogeler-server prune --older-than 30d`
    Prune {
        /// Delete nodes whose last sign of life is older than this (30d, 12h, ...)
        #[arg(long, value_name = "AGE", value_parser = vogeler_proto::duration::parse)]
        older_than: std::time::Duration,
        /// Only list the nodes that would be deleted
        #[arg(long)]
        dry_run: bool,
    },
}
