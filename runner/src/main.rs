//! `vogeler-runner`: parse flags, load config, start logging, run [`vogeler_runner::app`].

use std::process::ExitCode;

use clap::Parser;
use vogeler_config as config;
use vogeler_core::{exit, telemetry};
use vogeler_runner::{
    app,
    cli::{Cli, Command, Output},
    inventory as inv,
};

const PROGRAM: &str = "vogeler-runner";

fn keygen(dir: &std::path::Path, comment: Option<&str>, output: Output) -> ExitCode {
    let default_comment = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "runner".into()),
        vogeler_core::hostname().unwrap_or_else(|| "localhost".into())
    );
    match inv::keygen(dir, comment.unwrap_or(&default_comment)) {
        Ok((private, public, id)) => {
            app::print(inv::keygen_rows(&private, &public, &id).render(output));
            exit::code(exit::OK)
        }
        Err(e) => {
            eprintln!("vogeler-runner: keygen: {e}");
            exit::code(exit::CONFIG)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keygen { out, comment }) = &cli.command {
        return keygen(out, comment.as_deref(), cli.output);
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
    let settings = match vogeler_core::cli::settings_or_exit(PROGRAM, loaded, &cli.config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(&settings.log_level);
    tracing::info!(settings = ?settings, "configuration (secrets redacted)");
    vogeler_core::cli::start(PROGRAM, vogeler_runner::app::run(settings, cli))
}
