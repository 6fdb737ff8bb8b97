#!/usr/bin/env bash
# The sweeps behind BENCHMARKS.md: headwise's policies and kvpress's presses on SmolLM2-135M, question-agnostic,
# at one length (2048 or 4096; default 2048). Every store is resumable: rerun the same line to go on where an
# interrupted run stopped. One torch thread per process, as the numbers in BENCHMARKS.md were measured.
#
#   scripts/sweep.sh headwise [LENGTH] [MODEL]  # headwise's policies (writes results/MODEL-LENGTH/; the head-aware
#                                        # policy reads results/profiles/MODEL/profile.json, from `headwise profile`)
#   scripts/sweep.sh kvzip [LENGTH] [MODEL]  # headwise's kvzip on the same task files (results/MODEL-LENGTH-kvzip/)
#   scripts/sweep.sh kvpress [LENGTH]    # kvpress's presses on the same task files (results/kvpress-LENGTH.jsonl)
#   scripts/sweep.sh pack [LENGTH]       # compress both stores for committing (results/**/*.jsonl.gz)
#   scripts/sweep.sh snapshot [LENGTH]   # kvpress's finished tasks only, for the published tables
#                                        # (results/kvpress-LENGTH-complete.jsonl.gz)
#   scripts/sweep.sh gate LENGTH [MODEL] # only the full-cache calibration gate (results/gates/MODEL-LENGTH/)
#   scripts/sweep.sh sparse [LENGTH]     # the full cache with dense and with sparse prefill (results/sparse/)
#   scripts/sweep.sh sparse-dev [LENGTH] # wider sparse variants on a dev seed, to choose among (results/sparse/dev-*)
#   scripts/sweep.sh select [LENGTH]     # selection rules against eviction at equal tokens (results/select/)
#   scripts/sweep.sh aware [LENGTH]      # question-aware: headwise's SnapKV and head-aware policy against OpenVINO
#                                        # GenAI's cache eviction, task by task (results/aware/)
#   scripts/sweep.sh precision [LENGTH] [MODEL] [DTYPE]  # the full cache and SnapKV at 75% in float32 and in
#                                        # bfloat16, or in DTYPE only (results/precision/MODEL-LENGTH-DTYPE/)
#
# Every sweep runs in float32, the precision of the stores behind the tables (the precision sweep passes its own).
# Two tasks ask two questions per context (passkey, multikey), the others one (tasks.QUESTIONS). At 2K every task
# gets at least 25 answers per method and ratio, so four passing tasks give the headline at least 100; at 4K 12,
# so four give 48. The gate's calibration seed gets 24 answers per task at both lengths.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/sweep.sh headwise|kvzip|kvpress|pack|snapshot|gate|... [LENGTH] [MODEL]}
length=${2:-2048}
model=${3:-smollm2-135m}
out=results/$model-$length
store=results/kvpress-$length.jsonl
profile=results/profiles/$model/profile.json  # the head-aware policy's (`headwise profile --model $model`)
export OMP_NUM_THREADS=1
methods=streaming_llm,h2o,a2sf,snapkv,tova,knorm,random,headwise
# Needle depths: at 4K none nearer the start than 0.5 (about 2K tokens before the question), and multikey's none
# nearer than 0.7. SmolLM2-135M's full cache does not reach farther: one passkey needle alone at 4K scored 0.50 at
# depth 0.1 and 0.58 at 0.25, and multikey at depths 0.5/0.7/0.9 0.67, its misses at 0.5 (calibration seed;
# BENCHMARKS.md, "Task calibration").
case $length in
    4096) near=0.5,0.7,0.9 nearer=0.7,0.9 pairs=6 singles=12 ;;
    *) near=0.1,0.5,0.9 nearer=$near pairs=13 singles=25 ;;
esac
bench() {  # every group of tasks the model's gate can pass, the headline's two-question tasks first, with the
    # arguments given (Gemma 3 270M fails vartrack and frequent even with the full cache: BENCHMARKS.md, Results)
    case $model in
        gemma3-270m) groups passkey multikey qa "$@" ;;
        *) groups passkey multikey vartrack,qa,frequent "$@" ;;
    esac
}
groups() {  # the given groups of tasks (of passkey, multikey and a list of one-question tasks), with the arguments
    local -a chosen=()
    while [ $# -gt 0 ] && [[ $1 != -* ]]; do chosen+=("$1"); shift; done
    local -a all=()
    for names in "${chosen[@]}"; do
        case $names in
            passkey) all+=("passkey $pairs 12 $near") ;;
            multikey) all+=("multikey $pairs 12 $nearer") ;;
            *) all+=("$names $singles 24 $near") ;;
        esac
    done
    for group in "${all[@]}"; do
        read -r names contexts calibration depths <<< "$group"
        .venv/bin/headwise bench --model "$model" --lengths "$length" --depths "$depths" --threads 1 --no-progress \
            --dtype float32 --tasks "$names" --samples "$contexts" --calibration-samples "$calibration" "$@"
    done
}
case $what in
    headwise)
        bench --methods "$methods" --ratios 0.5,0.75,0.9 --out "$out" \
            -o headwise:profile=$profile ;;
    kvzip)  # the two-pass policy (a reconstruction of every context), in its own store on the same task files; the
        # gate is the headwise sweep's (same tasks and seeds): one calibration context here
        bench --methods kvzip --ratios 0.5,0.75,0.9 --calibration-samples 1 --out "results/$model-$length-kvzip" ;;
    kvpress)
        bench --out "$out" --tasks-only
        for names in passkey,multikey vartrack,qa frequent; do  # the headline's tasks first
            .venv-kvpress/bin/python scripts/peers/kvpress_runner.py --tasks "$out/tasks" --lengths "$length" \
                --task-names $names --ratios 0.5,0.75,0.9 --threads 1 --dtype float32 --out "$store"
        done ;;
    sparse)  # the gate is the headwise sweep's (same tasks and seeds): one calibration context here (the later wins)
        groups passkey multikey vartrack,qa --methods full --calibration-samples 1 --out "results/sparse/$model-$length" \
            --sparse ashape --sparse vertical_slash --sparse mass --sparse results/sparse/plan-smollm2-135m.json \
            --sparse results/sparse/plan-vs-smollm2-135m.json --sparse vertical_slash:vertical=16,slash=8 ;;
    sparse-dev)  # wider variants on dev seed 1, 3 contexts per task; the cheapest that keeps the dense score is
        # then reported on seed 0 (the last two --sparse of `sparse`)
        groups passkey multikey vartrack,qa --methods full --calibration-samples 1 --samples 3 --seed 1 \
            --out "results/sparse/dev-$model-$length" --sparse vertical_slash:vertical=16,slash=8 \
            --sparse vertical_slash:vertical=32,slash=8 --sparse mass:gamma=0.95 \
            --sparse results/sparse/plan-vs-smollm2-135m.json ;;
    select)  # about 1024, 256 and 64 of the ~1.95K tokens at 2K; the rules' window is 16 so that 64 leaves pages
        groups passkey multikey --calibration-samples 1 --out "results/select/$model-$length" \
            --methods quest,tokenselect,recycled,roles,h2o,snapkv,streaming_llm --ratios 0.475,0.869,0.967 \
            -o roles:profile=$profile -o quest:window=16 \
            -o tokenselect:window=16 -o recycled:window=16 -o roles:window=16 ;;
    aware)  # the headline's tasks, headwise then OpenVINO on each (so an interrupted run holds both on the same
        # contexts); the gate is the headwise sweep's (same tasks and seeds): one calibration context here
        for names in passkey multikey vartrack,qa; do
            groups "$names" --methods snapkv,headwise --ratios 0.75,0.9 --protocol aware --calibration-samples 1 \
                --out "results/aware/$model-$length" -o headwise:profile=$profile
            .venv-openvino/bin/python scripts/peers/openvino_runner.py --tasks "results/aware/$model-$length/tasks" \
                --lengths "$length" --task-names "$names" --ratios 0.75,0.9 --threads 1 --dtype float32 --no-progress \
                --out "results/aware/openvino-$length.jsonl"
        done ;;
    precision)  # the same tasks in both precisions (the gate is the headwise sweep's: one calibration context here)
        for dtype in ${4:-float32 bfloat16}; do
            groups passkey multikey vartrack,qa,frequent --methods full,snapkv --ratios 0.75 --calibration-samples 1 \
                --dtype "$dtype" --out "results/precision/$model-$length-$dtype"
        done ;;
    gate)  # one reported context per task (the later --samples wins) is a by-product; only the gate is used
        groups passkey multikey vartrack,qa,frequent --methods full --out "results/gates/$model-$length" --samples 1 ;;
    pack)
        .venv/bin/python -c "from pathlib import Path; from headwise.bench.store import pack
for p in ('$out/results.jsonl', '$store'): pack(Path(p))" ;;
    snapshot)  # the live store (or its packed copy) keeps resuming; the tables read only finished tasks
        .venv/bin/python -c "import gzip, json; from pathlib import Path; from headwise.bench import store
from headwise.report.html import write_atomic
kept, notes = store.complete_tasks(store.read_records(Path('$store')))
print(*notes, sep='\n')
lines = ''.join(json.dumps(r, ensure_ascii=False, sort_keys=True) + '\n' for r in kept)
write_atomic(Path('${store%.jsonl}-complete.jsonl.gz'), gzip.compress(lines.encode(), mtime=0))
print(len(kept), 'parts of finished tasks ->', '${store%.jsonl}-complete.jsonl.gz')" ;;
    *) echo "unknown sweep '$what': use headwise, kvzip, kvpress, pack, snapshot, gate, sparse, sparse-dev, select, aware or precision" >&2; exit 2 ;;
esac
