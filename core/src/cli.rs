//! Command-line flags every program shares, defined once so they read the same everywhere.

use std::path::PathBuf;

use vogeler_config::{ProgramSettings, Sources};

/// Broker connection and config file flags (all programs).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (TOML). Flags override it, `VOGELER_*` variables fill in between.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// Broker URL [env: VOGELER_AMQP__URL] [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    /// For a RabbitMQ cluster, its nodes comma-separated: the first that answers is used,
    /// the next on loss. Prefer the environment or the config file for URLs with passwords.
    #[arg(long, value_name = "URL[,URL...]", global = true)]
    pub amqp_url: Option<String>,

    /// Collective: prefixes every exchange and queue, so fleets can share a broker
    /// [env: VOGELER_AMQP__COLLECTIVE] [default: vogeler]
    #[arg(long, value_name = "NAME", global = true)]
    pub collective: Option<String>,

    /// How long to keep trying the broker (and database) at start-up before exiting 69,
    /// in seconds (30) or with a unit (500ms) [env: VOGELER_CONNECT_TIMEOUT] [default: 30]
    #[arg(long, value_name = "DURATION", global = true)]
    pub connect_timeout: Option<String>,

    /// Log filter for stderr: error, warn, info, debug, trace, or per-module directives
    /// [env: VOGELER_LOG__LEVEL] [default: info; warn for the runner]
    #[arg(long, value_name = "FILTER", global = true)]
    pub log_level: Option<String>,
}

/// CouchDB flags (server and runner). Credentials are deliberately not flags: set
/// `VOGELER_COUCHDB__USERNAME` and `VOGELER_COUCHDB__PASSWORD` (or `password_file`) instead.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CouchArgs {
    /// CouchDB URL [env: VOGELER_COUCHDB__URL] [default: http://127.0.0.1:5984]. For a
    /// CouchDB cluster, its nodes comma-separated: requests go to the first, the next when
    /// one cannot be reached.
    #[arg(long, value_name = "URL[,URL...]", global = true)]
    pub couchdb_url: Option<String>,

    /// Database holding one document per node [env: VOGELER_COUCHDB__DATABASE]
    /// [default: system_records]
    #[arg(long, value_name = "NAME", global = true)]
    pub database: Option<String>,
}

impl CommonArgs {
    /// The config sources these flags describe.
    pub fn sources(&self) -> Sources {
        let mut s = Sources {
            file: self.config.clone(),
            ..Default::default()
        };
        s.set("amqp.url", self.amqp_url.as_ref())
            .set("amqp.collective", self.collective.as_ref())
            .set("connect_timeout", self.connect_timeout.as_ref())
            .set("log.level", self.log_level.as_ref());
        s
    }
}

impl CouchArgs {
    pub fn add_to(&self, s: &mut Sources) {
        s.set("couchdb.url", self.couchdb_url.as_ref())
            .set("couchdb.database", self.database.as_ref());
    }
}

/// Text appended to every program's `--help`.
pub const ENV_HELP: &str = "\
Configuration layers (later wins): defaults < --config FILE < VOGELER_* environment < flags.
Environment names are VOGELER_<SECTION>__<KEY>, for example VOGELER_AMQP__URL,
VOGELER_COUCHDB__USERNAME, VOGELER_COUCHDB__PASSWORD.

Exit codes: 0 ok, 1 failure, 2 usage, 69 broker or database unavailable, 78 bad configuration.";

/// What to do with the configuration before (instead of) running.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Validate the configuration without contacting anything or reading the files it names,
    /// print every problem, and exit (0 valid, 78 invalid)
    #[arg(long, global = true)]
    pub check_config: bool,

    /// Print the effective configuration (defaults, file, environment and flags merged) as
    /// TOML with secrets replaced by ***, and exit
    #[arg(long, global = true, conflicts_with = "check_config")]
    pub print_config: bool,
}

/// The start of every binary: settings with their password files read, or exit 78 listing
/// every configuration problem. `--check-config` and `--print-config` report and exit
/// without contacting anything or reading secret files.
pub fn settings_or_exit<T: ProgramSettings>(
    program: &str,
    loaded: Result<T, vogeler_config::ConfigError>,
    args: &ConfigArgs,
) -> Result<T, std::process::ExitCode> {
    let fail = |e: vogeler_config::ConfigError| {
        eprintln!("{program}: {e}");
        crate::exit::code(crate::exit::CONFIG)
    };
    match loaded {
        Err(e) => Err(fail(e)),
        Ok(_) if args.check_config => {
            println!("{program}: configuration is valid");
            Err(crate::exit::code(crate::exit::OK))
        }
        Ok(s) if args.print_config => {
            print!("{}", s.to_toml());
            Err(crate::exit::code(crate::exit::OK))
        }
        Ok(s) => s.read_secrets().map_err(fail),
    }
}

/// The end of every binary's `main`: run `body` on a fresh runtime and turn its result into
/// the process exit status. An error is logged, printed as `{program}: {error}` (with its
/// hint) on stderr, and ends the process with the code its [`ExitStatus`] names.
///
/// [`ExitStatus`]: crate::exit::ExitStatus
pub fn start<E: crate::exit::ExitStatus>(
    program: &str,
    body: impl std::future::Future<Output = Result<u8, E>>,
) -> std::process::ExitCode {
    crate::exit::block_on(program, async {
        match body.await {
            Ok(code) => crate::exit::code(code),
            Err(e) => fail(program, &e),
        }
    })
}

/// Report an error the way [`start`] does and return its exit status (for work done before
/// or without a runtime).
pub fn fail<E: crate::exit::ExitStatus + ?Sized>(program: &str, e: &E) -> std::process::ExitCode {
    let code = e.exit_code();
    tracing::error!(error = %e, exit_code = code, "{program} stopped");
    match e.hint() {
        Some(hint) => eprintln!("{program}: {e}; {hint}"),
        None => eprintln!("{program}: {e}"),
    }
    crate::exit::code(code)
}
