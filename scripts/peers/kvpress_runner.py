"""Peer runner: NVIDIA kvpress presses on headwise's benchmark tasks, scored and recorded the headwise way.

Runs inside ``.venv-kvpress`` (made by ``scripts/peers/setup_kvpress.sh``): kvpress pins transformers below
5.3 while headwise runs on 5.x latest, so this script imports only headwise's standard-library modules
(``headwise.bench.scoring`` for the scores, ``headwise.bench.store`` to append records,
``headwise.memory`` for peak RSS, ``headwise.compat`` to hand the cache to the model under the name the installed
transformers takes and check it was filled) and mirrors the rest:

- the prompt (``prompt_parts``): the chat template applied to the user turn ``context + "\\n\\n" + question``,
  rendered once, cut at the end of the context text, both pieces tokenized separately, exactly as
  ``headwise.bench.runner.prompt_parts``; the context piece is prefilled with the press active, the
  question piece (question + the template's suffix) is appended afterwards with no compression;
- the stop tokens (tokenizer and generation-config end-of-sequence ids plus ``<|im_end|>``), greedy decoding
  of ``max_new_tokens`` from the task file, output stripped, and the decode rate (tokens after the first /
  decode seconds);
- the results record (``headwise.bench.store``) and its append + fsync + resume-by-key discipline.

Protocol (``agnostic``, headwise's default): the context piece goes through the bare decoder (``model.model``,
no LM head) inside the press's context manager, which is what ``KVPressTextGenerationPipeline`` does; the
question piece then goes through the full model at positions that continue the uncompressed context; then
greedy decoding. The pipeline's steps are reproduced rather than calling the pipeline because the pipeline
encodes context and question itself (headwise's token ids are wanted here) and gives no way to time the
prefill apart from decoding or to read the cache in between. ``--check-pipeline`` also runs the real pipeline
on the first sample of each cell and records whether its answer matches.

Memory is reported as measured, not as the nominal ratio: ``kv_bytes`` is the sum of ``nbytes`` of the key
and value tensors held in the cache right after the context prefill. The score-based presses (StreamingLLM,
SnapKV, TOVA, Knorm, ExpectedAttention) gather the kept entries into smaller tensors, so their bytes fall
with the ratio. AdaKV only records which entries to mask and keeps full-size tensors, so its ``kv_bytes``
equals the full cache's; ``kv_bytes_unmasked`` says what a real per-head eviction would hold. Peak process
memory is sampled from ``/proc/self/statm`` in a thread (a lower bound: allocations shorter than the
interval can be missed).

Method names are headwise's (``snapkv``, ``tova``, ...) so the report colours a method the same for both
libraries; ``library`` is ``"kvpress"`` and ``peer_method`` names the kvpress class. The record key hashes
headwise's cell fields plus ``library``.

Usage (from the repository root)::

    bash scripts/peers/setup_kvpress.sh
    .venv/bin/headwise bench --tasks-only --tasks passkey,multikey,vartrack --lengths 2048,4096 --samples 2
    .venv-kvpress/bin/python scripts/peers/kvpress_runner.py --tasks runs/bench/tasks \\
        --ratios 0.5,0.75,0.9 --out results/peers/kvpress.jsonl
    .venv/bin/headwise bench --report-only --peer results/peers/kvpress.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# headwise modules that need only the standard library are imported, not copied: the scoring rules, the
# store, the peak-RSS sampler, and the one place that hands a cache to a model and checks it was filled; so
# both libraries are scored and measured by the same code. Nothing that imports torch or transformers is
# loaded from headwise.
sys.path.insert(0, str(REPO / "src"))
from headwise.bench.scoring import score  # noqa: E402
from headwise.bench.store import append_record  # noqa: E402
from headwise.compat import forward  # noqa: E402
from headwise.memory import PeakRSS  # noqa: E402

DEFAULT_MODEL_DIR = Path(os.environ.get("HEADWISE_CACHE", Path.home() / ".cache" / "headwise")) / "models"
DEFAULT_OUT = REPO / "results" / "peers" / "kvpress.jsonl"
LIBRARY = "kvpress"
PROTOCOL = "agnostic"
SEPARATOR = "\n\n"
DEFAULT_MAX_NEW_TOKENS = 32

# ---------------------------------------------------------------------------------------------------------
# Tasks and prompts.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One benchmark sample as ``headwise.bench.tasks`` writes it (one JSON object per line)."""

    id: str
    task: str
    length: int
    context: str
    question: str
    answers: tuple[str, ...]
    scoring: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0
    depth: float | None = None
    needle_depth: float | None = None
    token_length: int | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Sample:
        """Build a sample from one JSONL object; fields this runner does not use are ignored."""
        required = ("id", "task", "length", "context", "question", "answers", "scoring")
        missing = [name for name in required if name not in obj]
        if missing:
            raise ValueError(f"task record {obj.get('id', '?')} lacks fields {missing}")
        answers = obj["answers"]
        return cls(
            id=str(obj["id"]),
            task=str(obj["task"]),
            length=int(obj["length"]),
            context=str(obj["context"]),
            question=str(obj["question"]),
            answers=tuple(answers if isinstance(answers, list) else [answers]),
            scoring=str(obj["scoring"]),
            max_new_tokens=int(obj.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            seed=int(obj.get("seed", 0)),
            depth=obj.get("depth"),
            needle_depth=obj.get("needle_depth"),
            token_length=obj.get("token_length"),
        )


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Task files from paths, globs and folders (a folder contributes its ``*.jsonl`` files)."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        for match in matches:
            p = Path(match)
            paths.extend(sorted(p.glob("*.jsonl")) if p.is_dir() else [p])
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"task file not found: {p}")
    return paths


def load_samples(paths: Iterable[Path]) -> list[Sample]:
    """All samples of the given JSONL task files, in file order."""
    samples: list[Sample] = []
    for path in paths:
        with open(path) as fh:
            samples.extend(Sample.from_json(json.loads(line)) for line in fh if line.strip())
    return samples


def select_samples(
    samples: Sequence[Sample], tasks: set[str] | None, lengths: set[int] | None, per_cell: int | None
) -> list[Sample]:
    """Filter by task and length and keep at most ``per_cell`` samples per (task, length)."""
    kept: list[Sample] = []
    counts: dict[tuple[str, int], int] = {}
    for s in samples:
        if (tasks and s.task not in tasks) or (lengths and s.length not in lengths):
            continue
        key = (s.task, s.length)
        if per_cell is not None and counts.get(key, 0) >= per_cell:
            continue
        counts[key] = counts.get(key, 0) + 1
        kept.append(s)
    return kept


def prompt_parts(tokenizer: Any, context: str, question: str, *, chat: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the prompt split after the context: (context part, question part + template suffix).

    Same construction as ``headwise.bench.runner.prompt_parts``: the user turn is ``context + "\\n\\n" +
    question``; with a chat template the whole chat prompt is rendered once, cut at the end of the context
    text, and the two pieces are tokenized separately (so the context part never holds a token that spans
    into the question). Without a chat template the context is tokenized with special tokens and the
    question part is ``"\\n\\n" + question + "\\nAnswer:"``.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + SEPARATOR + question}], add_generation_prompt=True, tokenize=False
        )
        end = rendered.index(context) + len(context)
        head = tokenizer(rendered[:end], add_special_tokens=False)["input_ids"]
        return list(head), list(tokenizer(rendered[end:], add_special_tokens=False)["input_ids"])
    head = tokenizer(context)["input_ids"]
    return list(head), list(tokenizer(SEPARATOR + question + "\nAnswer:", add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """Token ids that end a reply: tokenizer and generation-config end-of-sequence ids, plus ``<|im_end|>``."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


# ---------------------------------------------------------------------------------------------------------
# Presses.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PressSpec:
    """A kvpress press under the method name headwise's tables use, with its options and a factory."""

    name: str
    peer_class: str
    options: dict[str, Any]
    build: Callable[[float], Any]
    masks_only: bool = False


FULL = "full"
DEFAULT_PRESSES = ("streaming_llm", "snapkv", "tova", "knorm", "expected_attention", "adakv_expected_attention")


def press_specs() -> dict[str, PressSpec]:
    """The presses this runner knows, keyed by method name (headwise's names where headwise has the method).

    Options are kvpress's own parameter names and values (its defaults, written out so records say them).
    """
    import kvpress

    ea_options = {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True, "epsilon": 0.0}

    def expected_attention(ratio: float) -> Any:
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio, **ea_options)

    specs = [
        PressSpec(FULL, "none", {}, lambda ratio: None),
        PressSpec("streaming_llm", "StreamingLLMPress", {"n_sink": 4},
                  lambda ratio: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4)),
        PressSpec("snapkv", "SnapKVPress", {"window_size": 64, "kernel_size": 5},
                  lambda ratio: kvpress.SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5)),
        PressSpec("tova", "TOVAPress", {}, lambda ratio: kvpress.TOVAPress(compression_ratio=ratio)),
        PressSpec("knorm", "KnormPress", {}, lambda ratio: kvpress.KnormPress(compression_ratio=ratio)),
        PressSpec("expected_attention", "ExpectedAttentionPress", ea_options, expected_attention),
        PressSpec("adakv_expected_attention", "AdaKVPress(ExpectedAttentionPress)", {"alpha_safeguard": 0.2,
                  **ea_options}, lambda ratio: kvpress.AdaKVPress(press=expected_attention(ratio), alpha_safeguard=0.2),
                  masks_only=True),
    ]
    return {s.name: s for s in specs}


# ---------------------------------------------------------------------------------------------------------
# Model, cache measurement and one sample.
# ---------------------------------------------------------------------------------------------------------


def load_model(model_dir: Path) -> tuple[Any, Any]:
    """Load the float32 model and tokenizer from headwise's cache folder (safetensors + config + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: run headwise once to cache the model, e.g. "
            ".venv/bin/python -c \"from headwise.models import load_model; load_model('smollm2-135m')\""
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model, tokenizer


def cache_bytes(cache: Any) -> int:
    """Bytes physically held by the key and value tensors of a transformers cache."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "nbytes"):
                total += t.nbytes
    return total


def cache_tokens(cache: Any) -> list[int]:
    """Physical sequence length held per layer."""
    return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]


def masked_entries(model: Any) -> int:
    """Cache entries (token x KV head) that AdaKV-style presses mask but keep in memory, over all layers."""
    total = 0
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            total += int(idx[0].numel())
    return total


def prefill_with_press(model: Any, head: list[int], press: Any) -> Any:
    """A new cache holding the context ``head`` compressed by ``press`` (None: uncompressed).

    kvpress's protocol: the bare decoder (no LM head) prefills the context inside the press's hooks.
    """
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        forward(model.model, cache, torch.tensor([head]), evicts=press is not None)
    return cache


def run_sample(model: Any, tokenizer: Any, sample: Sample, press: Any, *, stop_ids: set[int]) -> dict[str, Any]:
    """Question-agnostic run of one sample: compress the context, append the question, decode greedily.

    Returns the per-sample fields of headwise's results records (``id``, ``depth``, ``needle_depth``,
    ``score``, ``output``, ``answers``, ``prompt_tokens``, ``kv_bytes``, ``prefill_seconds``,
    ``question_seconds``, ``decode_tokens_per_second``, ``peak_rss``, ``peak_rss_delta``) plus
    ``kv_bytes_full`` (an uncompressed cache of the same context) and ``kv_bytes_unmasked`` (``kv_bytes``
    minus the entries a masking press such as AdaKV hides but still holds).
    """
    import torch

    head, tail = prompt_parts(tokenizer, sample.context, sample.question)
    n_ctx = len(head)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    entry_bytes = 2 * head_dim * model.dtype.itemsize  # one key + one value vector of one KV head
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
    with torch.inference_mode(), PeakRSS() as mem:
        start = time.perf_counter()
        cache = prefill_with_press(model, head, press)
        prefill_seconds = time.perf_counter() - start
        kv = cache_bytes(cache)
        masked = masked_entries(model)
        start = time.perf_counter()
        # the question continues the positions of the uncompressed context (as the kvpress pipeline does)
        positions = torch.arange(n_ctx, n_ctx + len(tail)).unsqueeze(0)
        out = forward(model, cache, torch.tensor([tail]), position_ids=positions, logits_to_keep=1)
        question_seconds = time.perf_counter() - start
        logits = out.logits[:, -1, :]
        position = n_ctx + len(tail)
        start = time.perf_counter()
        tokens: list[int] = []
        for _ in range(sample.max_new_tokens):
            token = logits.argmax(dim=-1)
            tokens.append(int(token[0]))
            if tokens[-1] in stop_ids or len(tokens) == sample.max_new_tokens:
                break
            out = forward(model, cache, token.view(1, 1), position_ids=torch.tensor([[position]]))
            position += 1
            logits = out.logits[:, -1, :]
        decode_seconds = time.perf_counter() - start
    output = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return {
        "id": sample.id, "depth": sample.depth, "needle_depth": sample.needle_depth,
        "score": score(sample.scoring, output, sample.answers), "output": output, "answers": list(sample.answers),
        "prompt_tokens": n_ctx + len(tail), "kv_bytes": kv,
        "kv_bytes_full": n_ctx * cfg.num_hidden_layers * cfg.num_key_value_heads * entry_bytes,
        "kv_bytes_unmasked": kv - masked * entry_bytes,
        "prefill_seconds": prefill_seconds, "question_seconds": question_seconds,
        "decode_tokens_per_second": (len(tokens) - 1) / decode_seconds if decode_seconds > 0 else 0.0,
        "peak_rss": mem.peak, "peak_rss_delta": mem.delta,
    }


def pipeline_answer(model: Any, tokenizer: Any, sample: Sample, press: Any) -> str:
    """The answer of kvpress's own ``KVPressTextGenerationPipeline`` for a sample (a cross-check only).

    The pipeline gets ``context`` as the context and ``"\\n\\n" + question`` as the question, so the text it
    renders equals ours; it encodes the two parts itself, so token boundaries can differ slightly.
    """
    from kvpress import KVPressTextGenerationPipeline

    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    result = pipe(sample.context, question=SEPARATOR + sample.question, press=press,
                  max_new_tokens=sample.max_new_tokens)
    return str(result["answer"]).strip()


# ---------------------------------------------------------------------------------------------------------
# Results store: headwise's record format (see headwise.bench.store), append + fsync, resume by key.
# ---------------------------------------------------------------------------------------------------------

REQUIRED = ("key", "library", "model", "method", "ratio", "task", "length", "protocol", "score")


def cell_identity(
    model: str, method: str, ratio: float, task: str, length: int, n_samples: int, seed: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The fields of headwise's ``Cell`` for a kvpress cell (protocol agnostic, no prefill chunking)."""
    return {"model": model, "method": method, "ratio": float(ratio), "task": task, "length": int(length),
            "protocol": PROTOCOL, "n_samples": int(n_samples), "seed": int(seed), "options": dict(options),
            "chunk_size": None}


def cell_key(identity: dict[str, Any]) -> str:
    """Key of a cell: like ``headwise.bench.runner.Cell.key`` (sha256 of the sorted JSON, 20 hex digits),
    with ``library`` added to the hashed fields so a kvpress cell never shares a key with a headwise one."""
    blob = json.dumps({**identity, "library": LIBRARY}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def completed_keys(path: Path) -> set[str]:
    """Keys of the valid records already in ``path``; malformed (e.g. torn last) lines are skipped."""
    keys: set[str] = set()
    if not path.exists():
        return keys
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and all(name in record for name in REQUIRED):
            keys.add(record["key"])
    return keys


def git_commit(repo: Path) -> str | None:
    """HEAD commit of the headwise checkout this script lives in, or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance() -> dict[str, Any]:
    """Versions, git commit and machine facts carried by every record (headwise's provenance fields)."""
    import torch
    import transformers

    return {
        "library": LIBRARY,
        "versions": {"kvpress": version("kvpress"), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "git_commit": git_commit(REPO),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }


def _mean(rows: Sequence[dict[str, Any]], name: str) -> float:
    return float(statistics.fmean(r[name] for r in rows))


def summarize(identity: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A results record (without provenance) from a cell's identity and its per-sample rows."""
    return {
        "key": cell_key(identity), **identity,
        "score": _mean(rows, "score"), "kv_bytes": _mean(rows, "kv_bytes"),
        "kv_bytes_full": _mean(rows, "kv_bytes_full"), "kv_bytes_unmasked": _mean(rows, "kv_bytes_unmasked"),
        "peak_rss": max(r["peak_rss"] for r in rows), "peak_rss_delta": max(r["peak_rss_delta"] for r in rows),
        "prefill_seconds": _mean(rows, "prefill_seconds"), "question_seconds": _mean(rows, "question_seconds"),
        "decode_tokens_per_second": _mean(rows, "decode_tokens_per_second"),
        "token_length": _mean(rows, "prompt_tokens"),
        "samples": list(rows),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=[], help="task JSONL files, globs or folders (headwise bench "
                   "--tasks-only writes them to runs/bench/tasks)")
    p.add_argument("--presses", default=",".join((FULL, *DEFAULT_PRESSES)),
                   help="comma-separated press names (see --list-presses); 'full' is the no-press baseline")
    p.add_argument("--ratios", default="0.5,0.75,0.9", help="comma-separated compression ratios (fraction removed)")
    p.add_argument("--task-names", default="", help="comma-separated task names to keep (default: all in the files)")
    p.add_argument("--lengths", default="", help="comma-separated target lengths to keep (default: all)")
    p.add_argument("--samples", type=int, default=None, help="at most this many samples per (task, length)")
    p.add_argument("--model", default="smollm2-135m", help="model name recorded, and its folder under the headwise "
                   "cache ($HEADWISE_CACHE/models/NAME)")
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (overrides the cache folder)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSONL (appended; cells present skipped)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--check-pipeline", action="store_true", help="also run KVPressTextGenerationPipeline on the "
                   "first sample of each cell and record whether its answer matches ours")
    p.add_argument("--stop-at", default=None, metavar="HH:MM", help="UTC time after which no new cell starts "
                   "(a cell is not started when the previous cell's duration would take it past this time)")
    p.add_argument("--list-presses", action="store_true", help="print the known presses and exit")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would run and exit")
    return p.parse_args(argv)


def csv_list(text: str) -> list[str]:
    """Split a comma-separated option, dropping empty items."""
    return [t.strip() for t in text.split(",") if t.strip()]


def plan(
    samples: Sequence[Sample], presses: Sequence[str], ratios: Sequence[float], model: str, specs: dict[str, PressSpec]
) -> list[tuple[dict[str, Any], PressSpec, list[Sample]]]:
    """(identity, press, samples) for every cell, in the order that makes a partial sweep most useful:
    shortest length first; within a length the ``full`` baseline, then each ratio in the order given with
    every press, each over every task (so a finished (press, ratio) is averaged over all tasks)."""
    groups: dict[tuple[int, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.length, s.task), []).append(s)
    steps = [(FULL, 0.0)] if FULL in presses else []
    steps += [(name, ratio) for ratio in ratios for name in presses if name != FULL]
    out = []
    for length in sorted({length for length, _ in groups}):
        for name, ratio in steps:
            for (n, task), group in sorted(groups.items()):
                if n == length:
                    identity = cell_identity(model, name, ratio, task, length, len(group), group[0].seed,
                                             specs[name].options)
                    out.append((identity, specs[name], group))
    return out


def stop_time(hhmm: str) -> float:
    """Epoch seconds of the next occurrence of ``HH:MM`` UTC (today, or tomorrow if already past)."""
    hours, minutes = (int(x) for x in hhmm.split(":"))
    now = datetime.now(UTC)
    target = now.replace(hour=hours, minute=minutes, second=0, microsecond=0)
    if target <= now:
        target += timedelta(days=1)
    return target.timestamp()


def main(argv: Sequence[str] | None = None) -> int:
    """Run every cell not yet in ``--out``; print one line per finished cell."""
    args = parse_args(argv)
    specs = press_specs()
    if args.list_presses:
        for s in specs.values():
            note = "  (masks entries, keeps full-size tensors)" if s.masks_only else ""
            print(f"{s.name:26s} {s.peer_class:40s} {json.dumps(s.options)}{note}")
        return 0
    if not args.tasks:
        print("--tasks is required (task JSONL files from `headwise bench --tasks-only`)", file=sys.stderr)
        return 2
    presses = csv_list(args.presses)
    unknown = [p for p in presses if p not in specs]
    if unknown:
        print(f"unknown presses {unknown}; known: {', '.join(specs)}", file=sys.stderr)
        return 2
    ratios = [float(r) for r in csv_list(args.ratios)]
    if any(not 0 < r < 1 for r in ratios):
        print(f"ratios must lie in (0, 1), got {ratios}", file=sys.stderr)
        return 2
    samples = select_samples(
        load_samples(expand_paths(args.tasks)),
        set(csv_list(args.task_names)) or None,
        {int(x) for x in csv_list(args.lengths)} or None,
        args.samples,
    )
    if not samples:
        print("no samples selected", file=sys.stderr)
        return 2
    model_dir = args.model_dir or DEFAULT_MODEL_DIR / args.model
    done = completed_keys(args.out)
    cells = plan(samples, presses, ratios, args.model, specs)
    todo = [c for c in cells if cell_key(c[0]) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {args.out}, {len(todo)} to run "
          f"({sum(len(c[2]) for c in todo)} sample runs)", flush=True)
    if args.dry_run:
        for identity, _, group in todo:
            print(f"  {identity['method']:26s} ratio={identity['ratio']:<5g} {identity['task']:>10s} "
                  f"{identity['length']:>6d}  {len(group)} samples")
        return 0
    if not todo:
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    print(f"loaded {model_dir} in {time.perf_counter() - start:.1f}s", flush=True)
    stop_ids = stop_token_ids(tokenizer, model)
    meta = provenance()
    deadline = stop_time(args.stop_at) if args.stop_at else None
    last = 0.0
    for identity, spec, group in todo:
        if deadline is not None and time.time() + last > deadline:
            print(f"stopping: the next cell would end after {args.stop_at} UTC; re-run to resume", flush=True)
            break
        start = time.perf_counter()
        rows = [run_sample(model, tokenizer, s, spec.build(identity["ratio"]), stop_ids=stop_ids) for s in group]
        record = summarize(identity, rows)
        record.update(peer_method=spec.peer_class, masks_only=spec.masks_only)
        if args.check_pipeline:
            answer = pipeline_answer(model, tokenizer, group[0], spec.build(identity["ratio"]))
            record["pipeline_check"] = {"id": group[0].id, "answer": answer, "matches": answer == rows[0]["output"]}
        record["wall_seconds"] = time.perf_counter() - start
        append_record(args.out, {**record, **meta})
        last = record["wall_seconds"]
        print(f"{identity['method']:26s} ratio={identity['ratio']:<5g} {identity['task']:>10s} "
              f"{identity['length']:>6d}  score={record['score']:.3f}  kv={record['kv_bytes'] / 2**20:6.2f} MiB "
              f"(full {record['kv_bytes_full'] / 2**20:.2f})  prefill={record['prefill_seconds']:.2f}s  "
              f"decode={record['decode_tokens_per_second']:.1f} tok/s  wall={record['wall_seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
