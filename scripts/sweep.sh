#!/usr/bin/env bash
# The sweeps behind BENCHMARKS.md: headwise's policies and kvpress's presses on SmolLM2-135M, question-agnostic,
# at one length (2048 or 4096; default 2048). Every store is resumable: rerun the same line to go on where an
# interrupted run stopped. One torch thread per process, as the numbers in BENCHMARKS.md were measured.
#
#   scripts/sweep.sh headwise [LENGTH]   # headwise's policies (writes results/smollm2-135m-LENGTH/)
#   scripts/sweep.sh kvpress [LENGTH]    # kvpress's presses on the same task files (results/kvpress-LENGTH.jsonl)
#   scripts/sweep.sh pack [LENGTH]       # compress both stores for committing (results/**/*.jsonl.gz)
#   scripts/sweep.sh gate LENGTH [MODEL] # only the full-cache calibration gate (results/gates/MODEL-LENGTH/)
#
# Tasks that pass the full-cache gate at 2K get 25 contexts (50 answers) so the headline holds at least 100
# answers per method and ratio; the others 12 contexts (24 answers), enough for their per-task tables.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/sweep.sh headwise|kvpress|pack|gate [LENGTH] [MODEL]}
length=${2:-2048}
out=results/smollm2-135m-$length
store=results/kvpress-$length.jsonl
export OMP_NUM_THREADS=1
methods=streaming_llm,h2o,a2sf,snapkv,tova,knorm,random,headwise
bench() {
    .venv/bin/headwise bench --model smollm2-135m --lengths "$length" --ratios 0.5,0.75,0.9 --threads 1 \
        --methods "$methods" -o headwise:profile=results/profiles/smollm2-135m/profile.json \
        --calibration-samples 12 --out "$out" --no-progress "$@"
}
case $what in
    headwise)
        bench --tasks passkey,multikey --samples 25
        bench --tasks vartrack,qa,frequent --samples 12 ;;
    kvpress)
        bench --tasks passkey,multikey --samples 25 --tasks-only
        bench --tasks vartrack,qa,frequent --samples 12 --tasks-only
        .venv/bin/python -c "from pathlib import Path; from headwise.bench.store import unpack; unpack(Path('$store'))"
        for names in passkey,multikey vartrack,qa,frequent; do  # the headline's tasks first
            .venv-kvpress/bin/python scripts/peers/kvpress_runner.py --tasks "$out/tasks" --lengths "$length" \
                --task-names $names --ratios 0.5,0.75,0.9 --threads 1 --out "$store"
        done ;;
    gate)  # the reported seed's single context per task is a by-product; only the gate is used
        .venv/bin/headwise bench --model "${3:-smollm2-135m}" --lengths "$length" --methods full \
            --tasks passkey,multikey,vartrack,qa,frequent --samples 1 --calibration-samples 12 --threads 1 \
            --no-progress --out "results/gates/${3:-smollm2-135m}-$length" ;;
    pack)
        .venv/bin/python -c "from pathlib import Path; from headwise.bench.store import pack
for p in ('$out/results.jsonl', '$store'): pack(Path(p))" ;;
    *) echo "unknown sweep '$what': use headwise, kvpress, pack or gate" >&2; exit 2 ;;
esac
