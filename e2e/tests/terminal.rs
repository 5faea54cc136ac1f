//! Node-supplied text on the operator's terminal, through the real runner binary: a plugin
//! prints 100 crafted lines of escape and control sequences (and writes some to stderr);
//! every human-readable output shows them escaped, and JSON keeps them exact.

use std::time::Duration;

use vogeler_e2e::{
    TestStack, plugin_dir,
    programs::{program, run, with_couch},
    spawn_agent, spawn_server, wait_for,
};

/// Sequences that move the cursor, clear the screen, set the window title, reorder text or
/// ring the bell, each in a line of its own.
fn crafted() -> Vec<String> {
    let seeds = [
        "\u{1b}[2J\u{1b}[H",
        "\u{1b}]0;owned\u{7}",
        "\u{1b}[1A\u{1b}[2K",
        "ok\rFAILED",
        "\u{9b}31m",
        "\u{1b}P+q\u{1b}\\",
        "abc\u{8}\u{8}\u{8}xyz",
        "\u{7f}",
        "x\u{202e}txt.exe",
        "\u{2066}isolated\u{2069}",
        "\u{0}nul",
    ];
    (0..100)
        .map(|i| format!("{i:03} {}", seeds[i % seeds.len()]))
        .collect()
}

/// A character a terminal would act on, rather than print.
fn acts(c: char) -> bool {
    (c.is_control() && c != '\n') || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[tokio::test]
async fn escape_sequences_from_a_node_are_shown_not_obeyed() {
    let stack = TestStack::new().await;
    let data = tempfile::NamedTempFile::new().expect("data");
    let mut text = crafted().join("\n");
    text.push('\n');
    std::fs::write(data.path(), &text).expect("write");
    let plugin = format!(
        "name = \"esc\"\ncommand = [\"cat\", \"{}\"]\nformat = \"lines\"\n",
        data.path().display()
    );
    // Fails, with the sequences on stderr.
    let failing = format!(
        "name = \"escerr\"\ncommand = [\"sh\", \"-c\", \"cat {} >&2; exit 3\"]\nformat = \"lines\"\n",
        data.path().display()
    );
    let plugins = plugin_dir(&[("esc.toml", &plugin), ("escerr.toml", &failing)]);
    let _server = spawn_server(stack.server_settings());
    let _agent = spawn_agent(stack.agent_settings("esc01", plugins.path()));
    stack.wait_registered(&["esc01"]).await;

    let runner = |args: &[&str]| {
        let mut cmd = with_couch(program("vogeler-runner", &stack), &stack);
        cmd.args(args);
        run(cmd)
    };
    let mut outputs = Vec::new();
    for args in [
        &["-c", "esc", "-n", "esc01", "--timeout", "10"][..],
        &["-c", "esc", "-n", "esc01", "--timeout", "10", "--full"],
        &["-c", "escerr", "-n", "esc01", "--timeout", "10", "--full"],
    ] {
        let out = runner(args).await;
        outputs.push((args.join(" "), String::from_utf8(out.stdout).expect("utf8")));
    }
    // JSON is exact: the value is the lines the plugin printed, byte for byte.
    let out = runner(&[
        "-c",
        "esc",
        "-n",
        "esc01",
        "--timeout",
        "10",
        "--full",
        "--output",
        "json",
    ])
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let value = &json["results"]["esc01"]["value"];
    let exact: Vec<String> = crafted();
    assert_eq!(value, &serde_json::json!(exact), "{json:#}");

    // Stored, then changed: `show` and `history` print it too.
    wait_for("the value stored", Duration::from_secs(15), || async {
        stack
            .document("esc01")
            .await
            .is_some_and(|d| d.value("esc").is_some())
    })
    .await;
    std::fs::write(data.path(), "changed \u{1b}[31mred\n").expect("rewrite");
    let _ = runner(&["-c", "esc", "-n", "esc01", "--timeout", "10"]).await;
    wait_for(
        "the change in the history",
        Duration::from_secs(15),
        || async { !stack.history_ids().await.is_empty() },
    )
    .await;
    for args in [&["history", "esc01", "esc"][..], &["show", "esc01", "esc"]] {
        let out = runner(args).await;
        outputs.push((args.join(" "), String::from_utf8(out.stdout).expect("utf8")));
    }

    for (args, stdout) in &outputs {
        let raw: Vec<char> = stdout.chars().filter(|c| acts(*c)).collect();
        assert!(
            raw.is_empty(),
            "`vogeler-runner {args}` printed {raw:?}:\n{stdout}"
        );
    }
    let table_full = &outputs[1].1;
    assert!(table_full.contains("\\u{202e}"), "{table_full}");
    let stderr_tail = &outputs[2].1;
    assert!(
        stderr_tail.contains("\\u{1b}") || stderr_tail.contains("\\u001b"),
        "{stderr_tail}"
    );
    println!(
        "{} crafted lines through {} human-readable outputs: none printed a control or bidi character raw; JSON kept them exact",
        exact.len(),
        outputs.len()
    );
}
