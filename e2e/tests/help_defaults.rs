//! The `[default: X]` every program's `--help` shows is the default the configuration
//! applies: each one is checked against the constant in `vogeler_config::defaults`, so
//! changing a default without its help text (or the other way round) fails here. Needs no
//! broker or database.

use std::time::Duration;

use clap::CommandFactory;
use vogeler_config::defaults as d;
use vogeler_proto::duration;

/// What the default of the setting behind `env` is, as `--help` may write it.
enum Expected {
    Text(String),
    Time(Duration),
}

fn expected(env: &str) -> Option<Expected> {
    let text = |s: &str| Some(Expected::Text(s.to_string()));
    let secs = |s: u64| Some(Expected::Time(Duration::from_secs(s)));
    match env {
        "VOGELER_AMQP__URL" => text(d::AMQP_URL),
        "VOGELER_AMQP__COLLECTIVE" => text(d::COLLECTIVE),
        "VOGELER_CONNECT_TIMEOUT" => secs(d::CONNECT_TIMEOUT_SECS),
        "VOGELER_COUCHDB__URL" => text(d::COUCHDB_URL),
        "VOGELER_COUCHDB__DATABASE" => text(d::DATABASE),
        "VOGELER_AGENT__PLUGIN_DIR" => text(d::PLUGIN_DIR),
        "VOGELER_AGENT__CONCURRENCY" => text(&d::AGENT_CONCURRENCY.to_string()),
        "VOGELER_AGENT__HEARTBEAT" => secs(d::AGENT_HEARTBEAT_SECS),
        "VOGELER_AGENT__AUTHORIZED_KEYS" => text(d::AUTHORIZED_KEYS),
        "VOGELER_AGENT__STATE_DIR" => text(d::STATE_DIR),
        "VOGELER_SERVER__PREFETCH" => text(&d::SERVER_PREFETCH.to_string()),
        "VOGELER_SERVER__BATCH_SIZE" => text(&d::SERVER_BATCH_SIZE.to_string()),
        "VOGELER_RUNNER__TIMEOUT" => secs(d::RUNNER_TIMEOUT_SECS),
        "VOGELER_RUNNER__TTL" => secs(d::RUNNER_TTL_SECS),
        "VOGELER_RUNNER__SIGNING_KEY" => text(d::SIGNING_KEY),
        "VOGELER_LOG__LEVEL" => text(&format!(
            "{}; {} for the runner",
            d::LOG_LEVEL,
            d::RUNNER_LOG_LEVEL
        )),
        _ => None,
    }
}

/// Defaults that are not a constant: computed at run time, or "not set".
const NOT_CONSTANT: &[&str] = &["off", "the host name"];

/// Every `[env: VAR] ... [default: X]` pair in the help of `cmd` and its subcommands.
fn pairs(cmd: &clap::Command, out: &mut Vec<(String, String, String)>) {
    for arg in cmd.get_arguments() {
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('\n', " ");
        let (Some(env), Some(default)) = (between(&help, "[env: "), between(&help, "[default: "))
        else {
            continue;
        };
        out.push((
            format!("{} --{}", cmd.get_name(), arg.get_id()),
            env,
            default,
        ));
    }
    for sub in cmd.get_subcommands() {
        pairs(sub, out);
    }
}

fn between(text: &str, open: &str) -> Option<String> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(']')? + start;
    Some(text[start..end].to_string())
}

#[test]
fn help_defaults_are_the_configured_defaults() {
    let mut found = Vec::new();
    for cmd in [
        vogeler_agent::cli::Cli::command(),
        vogeler_server::cli::Cli::command(),
        vogeler_runner::cli::Cli::command(),
    ] {
        pairs(&cmd, &mut found);
    }
    assert!(found.len() >= 15, "too few defaults found: {found:#?}");
    let mut wrong = Vec::new();
    for (arg, env, shown) in &found {
        if NOT_CONSTANT.contains(&shown.as_str()) {
            continue;
        }
        let ok = match expected(env) {
            Some(Expected::Text(want)) => *shown == want,
            Some(Expected::Time(want)) => duration::parse(shown).is_ok_and(|got| got == want),
            None => {
                wrong.push(format!(
                    "{arg}: [env: {env}] has no entry in this test's table; add one"
                ));
                continue;
            }
        };
        if !ok {
            wrong.push(format!(
                "{arg}: help says [default: {shown}], the configuration applies another for {env}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
