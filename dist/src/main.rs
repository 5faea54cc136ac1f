//! `vogeler-dist assets OUT`: write man pages and shell completions (used by
//! `deploy/package.sh`).

use std::path::PathBuf;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [verb, out] = args.as_slice() else {
        bail!("usage: vogeler-dist assets OUT_DIR");
    };
    if verb != "assets" {
        bail!("unknown command {verb:?}; usage: vogeler-dist assets OUT_DIR");
    }
    let written = vogeler_dist::write_assets(&PathBuf::from(out))
        .with_context(|| format!("cannot write assets to {out}"))?;
    println!("wrote {} files under {out}", written.len());
    Ok(())
}
