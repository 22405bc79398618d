#!/usr/bin/env bash
# Render a `nakt report` page to a PNG with headless Chromium (Debian: apt-get install chromium).
#   bash benchmarks/render_report.sh REPORT_DIR [OUT.png] [WIDTHxHEIGHT]
set -euo pipefail
report="${1:?usage: render_report.sh REPORT_DIR [OUT.png] [WIDTHxHEIGHT]}"
out="${2:-$report/report.png}"
size="${3:-1400x4000}"
[ -f "$report/index.html" ] || { echo "render_report.sh: $report/index.html: no nakt report there" >&2; exit 2; }
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "render_report.sh: no Chromium found (Debian: apt-get install chromium)" >&2; exit 2; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${size/x/,}" \
    --screenshot="$(realpath -m "$out")" "file://$(realpath "$report")/index.html" 2>/dev/null
[ -s "$out" ] || { echo "render_report.sh: Chromium wrote no $out" >&2; exit 1; }
echo "wrote $out"
