#!/usr/bin/env bash
# The worked example and pictures of docs/INTERPRET.md: every command the page shows, run on the committed example
# prompt (docs/examples/passkey.txt, the benchmark's passkey task at 768 tokens), then headless Chromium
# screenshots of the pages into docs/img/. float32 and one thread, as the page's figures were measured.
#
#   scripts/interpret_pictures.sh            # -> runs/interpret/*.html and *.txt, docs/img/interpret-*.png
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/interpret
img=docs/img
prompt=docs/examples/passkey.txt
profile=results/profiles/smollm2-135m/profile.json
probe=results/lookback/probe-smollm2-135m.json
common=(--threads 1 --dtype float32)
mkdir -p "$out" "$img"
hw=.venv/bin/headwise

$hw attribute -f "$prompt" --method retrieval --profile "$profile" --out "$out/why-full.html" "${common[@]}" \
    | tee "$out/why-full.txt"
$hw attribute -f "$prompt" --method retrieval --profile "$profile" --policy snapkv --ratio 0.9 \
    --out "$out/why-snapkv90.html" "${common[@]}" | tee "$out/why-snapkv90.txt"
$hw attribute -f "$prompt" --method rollout --out "$out/rollout-full.html" "${common[@]}" | tee "$out/rollout-full.txt"
$hw lookback score -f "$prompt" --probe "$probe" "${common[@]}" | tee "$out/lookback-full.txt"
$hw lookback score -f "$prompt" --probe "$probe" --policy snapkv --ratio 0.9 "${common[@]}" \
    | tee "$out/lookback-snapkv90.txt"
$hw heads -f "$prompt" --query -1 --out "$out/heads" "${common[@]}"

shoot() {  # page, picture, height: a screenshot of the top of a page
    chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
        --disable-sync --no-first-run --user-data-dir="$(mktemp -d)" --hide-scrollbars --window-size="1100,$3" \
        --virtual-time-budget=10000 \
        --screenshot="$2" "file://$PWD/$1" 2>/dev/null
}
shoot "$out/why-full.html" "$img/interpret-why-full.png" 1500
shoot "$out/why-snapkv90.html" "$img/interpret-why-snapkv90.png" 1500
shoot "$out/rollout-full.html" "$img/interpret-rollout-full.png" 1100
shoot "$out/heads/heads.html" "$img/interpret-heads.png" 1300
echo "pictures in $img, pages and printed output in $out"
