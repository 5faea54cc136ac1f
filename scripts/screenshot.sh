#!/usr/bin/env bash
# Take the README's screenshot: log into the stack's Fauxton as admin with headless Chromium
# and save a PNG of one node document (the demo's web01 by default).
#
#   scripts/screenshot.sh [OUT.png] [DOC]    default docs/images/fauxton-web01.png web01
#
# Needs the stack and the demo's documents (scripts/stack.sh up; scripts/demo.sh), Chromium
# (Debian: apt-get install chromium) and node with npm. playwright-core (the driver only, no
# browser download) is installed into $VOGELER_SCREENSHOT_DIR (default /tmp/vogeler-screenshot),
# never into the checkout. The admin password is read from the stack's file by the driver: it
# is never on a command line.
set -euo pipefail
cd "$(dirname "$0")/.."

out=$(realpath -m "${1:-docs/images/fauxton-web01.png}")
doc=${2:-web01}
work=${VOGELER_SCREENSHOT_DIR:-/tmp/vogeler-screenshot}
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$chromium" ] || { echo "screenshot: no chromium; install it: apt-get install -y chromium" >&2; exit 1; }
command -v npm >/dev/null || { echo "screenshot: no npm; install it: apt-get install -y npm" >&2; exit 1; }

eval "$(scripts/stack.sh env)"
unset VOGELER_TEST_COUCHDB_URL
[ -n "${VOGELER_COUCHDB__PASSWORD_FILE:-}" ] \
  || { echo "screenshot: the stack has no admin password file (is it Apache CouchDB? scripts/stack.sh status)" >&2; exit 1; }

mkdir -p "$work"
if [ ! -d "$work/node_modules/playwright-core" ]; then
  echo "== installing playwright-core into $work" >&2
  npm install --silent --no-audit --no-fund --prefix "$work" playwright-core >&2
fi
cat >"$work/shot.js" <<'EOF'
// node shot.js CHROMIUM BASE_URL USER PASSWORD_FILE DB DOC OUT
const { chromium } = require('playwright-core');
const fs = require('fs');
const [exe, base, user, pwFile, db, doc, out] = process.argv.slice(2);
const password = fs.readFileSync(pwFile, 'utf8').trim();
(async () => {
  const browser = await chromium.launch({ executablePath: exe, args: ['--no-sandbox'] });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    await page.goto(`${base}/_utils/#login`);
    await page.fill('#username', user);
    await page.fill('#password', password);
    await page.click('#login-btn');
    await page.waitForSelector('text=Log Out', { timeout: 15000 });
    await page.goto(`${base}/_utils/#database/${db}/${encodeURIComponent(doc)}`);
    await page.waitForSelector('.ace_editor', { timeout: 20000 });
    // Fold every value longer than a few lines (the package list, the facts, ...) except the
    // `vogeler` object and its `plugins`, so every plugin key shows on one screen.
    await page.waitForFunction(() => document.querySelector('.ace_editor').env.editor.getSession().getLength() > 3);
    await page.evaluate(() => {
      const ed = document.querySelector('.ace_editor').env.editor;
      const s = ed.getSession();
      for (let r = 0; r < s.getLength(); r++) {
        const m = s.getLine(r).match(/^( *)"([^"]+)": [\[{]\s*$/);
        const range = m && s.getFoldWidgetRange(r);
        if (!range || m[0].trim() === '"vogeler": {' || (m[1].length === 4 && m[2] === 'plugins')) continue;
        if (range.end.row - r > 4) {
          s.addFold('...', range);
          r = range.end.row;
        }
      }
      ed.gotoLine(1, 0, false);
      ed.scrollToLine(0, false, false);
    });
    // Let the "You have been logged in." notice fade, and keep the pointer off the page.
    await page.waitForSelector('text=You have been logged in.', { state: 'hidden', timeout: 20000 }).catch(() => {});
    await page.mouse.move(0, 899);
    await page.waitForTimeout(500);
    await page.screenshot({ path: out });
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(`screenshot: ${e.message}`); process.exit(1); });
EOF
base=$(sed -E 's#^(https?://)[^/@]*@#\1#; s#/+$##' <<<"$VOGELER_COUCHDB__URL")
node "$work/shot.js" "$chromium" "$base" "$VOGELER_COUCHDB__USERNAME" "$VOGELER_COUCHDB__PASSWORD_FILE" \
  "${VOGELER_COUCHDB__DATABASE:-system_records}" "$doc" "$out"
echo "saved $out ($doc in Fauxton at $base/_utils)"
