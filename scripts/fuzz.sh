#!/usr/bin/env bash
# Fuzz every target in fuzz/ for a bounded time each (libFuzzer through cargo fuzz).
#
#   scripts/fuzz.sh [SECONDS per target, default 60] [TARGET...]
#
# Targets: command (signature check + strict command parsing), wire_decode (every message
# kind, re-encoded and re-decoded), plugin_output (every output format), plugin_file (TOML
# and legacy .cfg plugin files), config (config files, validated for every program).
# This machine has only the stable toolchain: cargo fuzz runs with RUSTC_BOOTSTRAP=1, with
# AddressSanitizer when the toolchain has its runtime, without otherwise. A crash leaves
# its input in fuzz/artifacts/<target>/; turn it into a regression test beside the code it
# broke, then fix. Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(command wire_decode plugin_output plugin_file config)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (a few minutes)" >&2
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
sanitizer=address
if ! cargo fuzz build --sanitizer address "${targets[0]}" >/dev/null 2>&1; then
  echo "fuzz: no AddressSanitizer runtime here; fuzzing without a sanitizer" >&2
  sanitizer=none
fi
status=0
printf '%-14s %8s %10s %8s\n' target seconds runs result
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log=$(mktemp)
  if cargo fuzz run --sanitizer "$sanitizer" "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
  fi
  runs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
  printf '%-14s %8s %10s %8s\n' "$t" "$secs" "${runs:-?}" "$result"
  if [ "$result" = CRASH ]; then
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5 >&2
  fi
  rm -f "$log"
done
exit $status
