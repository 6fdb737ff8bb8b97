"""Peer runner: NVIDIA kvpress presses on headwise's benchmark tasks, on headwise's own protocol and records.

Runs inside ``.venv-kvpress`` (made by ``scripts/peers/setup_kvpress.sh``: kvpress 0.5.5 pins transformers
below 5.3, which headwise supports too, so headwise is installed there). Everything that is not kvpress's is
headwise's, imported rather than copied: the prompt split, the template check, BOS handling, greedy answers,
scoring and fidelity (:mod:`headwise.bench.protocol`), the part loop and its record
(:func:`headwise.bench.runner.run_part`) and the sweep around it (:func:`headwise.bench.runner.sweep`, given a
:class:`headwise.bench.runner.Peer`), the grouping of questions by context, the version check and
provenance (:mod:`headwise.bench.runner`), the store (:mod:`headwise.bench.store`) and the model loader
(:func:`headwise.models.load_model`).

What is kvpress's
-----------------
For each press x ratio x context, the context piece is prefilled ONCE through the bare decoder inside the
press's context manager, as ``KVPressTextGenerationPipeline`` does; every question of the context is then
answered on its own deep copy of that cache (:func:`headwise.bench.protocol.answer`) and the full cache's
answer is teacher-forced on another copy (:func:`headwise.bench.protocol.follow`). The no-press cell runs first
on each context: its answers are the fidelity references.

kvpress keeps a plain ``DynamicCache`` whose length is what it holds, while the pipeline feeds the question at
positions that continue the *uncompressed* context. :class:`PressCache` remembers how many context tokens the
press removed and :class:`ContinuedPositions` (the model, given explicit ``position_ids``) adds them back, so
the shared protocol feeds the same positions as the pipeline.

Memory is what the tensors hold: ``kv_bytes`` is the ``nbytes`` of the keys and values after the context.
StreamingLLM, SnapKV, TOVA, Knorm, ExpectedAttention, KeyDiff and ChunkKV gather the kept entries into smaller
tensors. AdaKV, KVzip and DuoAttention only record which entries to mask (kvpress overwrites them with a fake
key at every attention call) and keep full-size tensors, so their ``kv_bytes`` is the full cache's;
``kv_bytes_unmasked`` says what dropping the masked entries would hold. Peak memory does not fall for any press:
they all compress after the whole context is prefilled.

The model runs in ``--dtype`` (the same choices and default as ``headwise bench``; a cell records it), so that
both libraries of one table run at the same precision.

Records are the part records of :func:`headwise.bench.runner.run_part` (one per cell x context) with
``library: "kvpress"``, ``peer_method`` (the kvpress class), ``masks_only`` and ``kv_bytes_unmasked``. Method
names are headwise's where the method is the same (``snapkv``, ``tova``, ``knorm``, ``streaming_llm``). A cell's
key holds every field of the press dataclass (defaults included) and :func:`fingerprint`: kvpress, transformers
and torch versions, this file and headwise's protocol code. A store holding another fingerprint is refused
unless ``--allow-mixed-versions``.

Usage (from the repository root)::

    bash scripts/peers/setup_kvpress.sh
    .venv-kvpress/bin/python scripts/peers/kvpress_runner.py --tasks runs/bench/tasks --ratios 0.5,0.75,0.9 \\
        --threads 1 --out results/kvpress-2048.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

import headwise
from headwise.bench import runner
from headwise.bench.calibration import CALIBRATION_SEED, FULL
from headwise.bench.runner import Cell, Context, context_digest, contexts
from headwise.bench.store import read_records
from headwise.bench.tasks import SEPARATOR, Sample, read_samples
from headwise.checks import add_dtype_option
from headwise.compat import cache_kwargs, forward
from headwise.errors import HeadwiseError
from headwise.models import LoadedModel, load_model, resolve_dtype
from headwise.registry import cached_folder

LIBRARY = "kvpress"
PROTOCOL = "agnostic"
#: headwise modules whose code decides a kvpress result (with this file): the protocol, the part loop, the
#: scoring rules, prefill/decode, the cache hand-off and the model loader.
PROTOCOL_CODE = ("bench/protocol.py", "bench/runner.py", "bench/scoring.py", "generation.py", "compat.py", "models.py")


# ---------------------------------------------------------------------------------------------- presses


@dataclass(frozen=True)
class PressSpec:
    """A kvpress press under the method name of headwise's tables: its class, its options as given (the rest
    are kvpress's defaults) and a factory from the fraction removed to a press."""

    name: str
    peer_class: str
    options: dict[str, Any]
    build: Callable[[float], Any]
    masks_only: bool = False
    note: str = ""


def press_specs() -> dict[str, PressSpec]:
    """The presses this runner knows, keyed by method name. Options are kvpress's defaults except where given
    (ChunkKV on SnapKV with chunks of 20 tokens, as kvpress's evaluation registry has it)."""
    import kvpress

    specs = [
        PressSpec("streaming_llm", "StreamingLLMPress", {}, lambda r: kvpress.StreamingLLMPress(compression_ratio=r)),
        PressSpec("snapkv", "SnapKVPress", {}, lambda r: kvpress.SnapKVPress(compression_ratio=r)),
        PressSpec("tova", "TOVAPress", {}, lambda r: kvpress.TOVAPress(compression_ratio=r)),
        PressSpec("knorm", "KnormPress", {}, lambda r: kvpress.KnormPress(compression_ratio=r)),
        PressSpec(
            "expected_attention",
            "ExpectedAttentionPress",
            {},
            lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
        ),
        PressSpec(
            "adakv_expected_attention",
            "AdaKVPress(ExpectedAttentionPress)",
            {},
            lambda r: kvpress.AdaKVPress(press=kvpress.ExpectedAttentionPress(compression_ratio=r)),
            masks_only=True,
        ),
        PressSpec("keydiff", "KeyDiffPress", {}, lambda r: kvpress.KeyDiffPress(compression_ratio=r)),
        PressSpec(
            "chunkkv",
            "ChunkKVPress(SnapKVPress)",
            {"press": "SnapKVPress", "chunk_length": 20},
            lambda r: kvpress.ChunkKVPress(press=kvpress.SnapKVPress(compression_ratio=r), chunk_length=20),
        ),
        PressSpec("kvzip", "KVzipPress", {}, lambda r: kvpress.KVzipPress(compression_ratio=r), masks_only=True),
        PressSpec(
            "duo_attention",
            "DuoAttentionPress(on_the_fly_scoring)",
            {"on_the_fly_scoring": True},
            lambda r: kvpress.DuoAttentionPress(head_compression_ratio=r, on_the_fly_scoring=True),
            masks_only=True,
            note="scores heads on 50 BookSum chapters loaded from the Hugging Face hub: needs the network",
        ),
    ]
    return {s.name: s for s in specs}


#: Presses run by default: those kvpress 0.5.5 runs on CPU, offline.
DEFAULT_PRESSES = (
    "streaming_llm",
    "snapkv",
    "tova",
    "knorm",
    "expected_attention",
    "adakv_expected_attention",
    "keydiff",
    "chunkkv",
    "kvzip",
)


def press_options(press: Any) -> dict[str, Any]:
    """Every init field of a press dataclass with its value, defaults included, and its class; a nested press
    (AdaKV's, ChunkKV's) the same way. None (no press) gives ``{}``."""
    if press is None:
        return {}
    options: dict[str, Any] = {"class": type(press).__name__}
    for f in dataclasses.fields(press):
        if f.init:
            value = getattr(press, f.name)
            options[f.name] = press_options(value) if dataclasses.is_dataclass(value) else value
    return options


# ---------------------------------------------------------------------------------------------- identity


def peer_versions() -> dict[str, str]:
    """Versions of the libraries that compute a kvpress result."""
    import transformers

    return {
        "kvpress": version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "headwise": headwise.__version__,
    }


@cache
def fingerprint() -> str:
    """16 hex digits naming kvpress's, transformers' and torch's versions, this file and headwise's protocol code."""
    root = Path(headwise.__file__).parent
    return runner.code_fingerprint([Path(__file__).resolve(), *(root / name for name in PROTOCOL_CODE)],
                                   peer_versions())


def provenance() -> dict:
    """headwise's provenance fields, for kvpress."""
    return {**runner.provenance(), "library": LIBRARY, "versions": peer_versions()}


def plan_cells(
    model: str,
    specs: dict[str, PressSpec],
    presses: Sequence[str],
    ratios: Sequence[float],
    task: str,
    length: int,
    n_contexts: int,
    seed: int,
    dtype: str = "float32",
) -> list[Cell]:
    """The cells of one task and length: the no-press cell, then every press x ratio, in the model's ``dtype``."""
    common = dict(
        model=model,
        dtype=dtype,
        task=task,
        length=length,
        protocol=PROTOCOL,
        n_samples=n_contexts,
        seed=seed,
        fingerprint=fingerprint(),
    )
    cells = [Cell(method=FULL, ratio=0.0, **common)]
    for name in presses:
        cells += [
            Cell(
                method=name,
                ratio=r,
                options=specs[name].options,
                resolved=press_options(specs[name].build(r)),
                **common,
            )
            for r in ratios
        ]
    return cells


# ---------------------------------------------------------------------------------------------- caches


class PressCache(DynamicCache):
    """kvpress's ``DynamicCache``, which also remembers how many context tokens the press removed."""

    def __init__(self) -> None:
        super().__init__()
        self.removed = 0


class ContinuedPositions(torch.nn.Module):
    """The model, fed positions that continue the uncompressed context: a token's position is the number of
    tokens the cache holds plus those its press removed (``PressCache.removed``), as kvpress's pipeline does.
    It takes the cache as ``cache`` and hands it on under the name the model takes (:mod:`headwise.compat`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.generation_config = model.generation_config

    def forward(self, input_ids: torch.Tensor, cache: PressCache, **kwargs: Any) -> Any:
        start = cache.get_seq_length() + cache.removed
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.inner(input_ids=input_ids, position_ids=positions, **cache_kwargs(self.inner, cache), **kwargs)


def masked_entries(model: torch.nn.Module) -> int:
    """Entries (token x KV head) that masking presses (AdaKV, KVzip, DuoAttention) mask but keep, over all layers."""
    total = 0
    for layer in model.model.layers:
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        if indices is not None:
            total += int(indices[0].numel())
    return total


@torch.inference_mode()
def prefill_with_press(model: torch.nn.Module, ids: list[int], press: Any) -> PressCache:
    """The context ``ids`` through the bare decoder (no LM head) inside ``press`` (None: no press), as
    ``KVPressTextGenerationPipeline`` prefills it."""
    cache = PressCache()
    with press(model) if press is not None else contextlib.nullcontext():
        forward(model.model, cache, torch.tensor([ids]), evicts=press is not None)
    cache.removed = len(ids) - cache.get_seq_length()
    return cache


class PressContext(Context):
    """One context and its questions, whose caches kvpress's presses build (see the module docstring)."""

    def __init__(self, lm: LoadedModel, questions: Sequence[Sample], specs: dict[str, PressSpec]) -> None:
        super().__init__(dataclasses.replace(lm, model=ContinuedPositions(lm.model)), questions, share_prefill=False)
        self.model = lm.model
        self.specs = specs
        self.masked = 0  # entries masked in the last cache built

    def press(self, cell: Cell) -> Any:
        return None if cell.method == FULL else self.specs[cell.method].build(cell.ratio)

    def compressed(self, cell: Cell, ids: list[int]) -> tuple[PressCache, float, float]:
        """The cache of ``ids`` under ``cell``'s press and its prefill seconds (the compression included)."""
        start = time.perf_counter()
        cache = prefill_with_press(self.model, ids, self.press(cell))
        seconds = time.perf_counter() - start
        self.masked = masked_entries(self.model)
        return cache, seconds, 0.0


def entry_bytes(model: torch.nn.Module) -> int:
    """Bytes of one key and one value vector of one KV head."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * head_dim * model.dtype.itemsize


def press_fields(ctx: PressContext, cell: Cell, record: dict) -> dict:
    """What a kvpress part adds to headwise's part record: the press class, whether it only masks entries, and the
    bytes a real eviction of the masked entries would hold."""
    spec = ctx.specs.get(cell.method)
    return {
        "peer_method": spec.peer_class if spec else "none",
        "masks_only": bool(spec and spec.masks_only),
        "kv_bytes_unmasked": record["kv_bytes"] - ctx.masked * entry_bytes(ctx.model),
    }


# ---------------------------------------------------------------------------------------------- pipeline check


def pipeline_answers(model: torch.nn.Module, tokenizer: Any, questions: Sequence[Sample], press: Any) -> list[str]:
    """kvpress's own ``KVPressTextGenerationPipeline`` on one context, stripped answers in the questions' order.

    The questions that share an answer prefix go in one call (its multi-question support: one prefill, each
    answer then cut off the cache), since the pipeline takes one ``answer_prefix`` per call. It gets
    ``"\\n\\n" + question`` as each question, so the text it renders is the protocol's prompt; it stops at
    the generation config's end-of-sequence ids only and takes one ``max_new_tokens`` (the largest of the
    questions').
    """
    from kvpress import KVPressTextGenerationPipeline

    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    got: dict[str, str] = {}
    for prefix in dict.fromkeys(q.answer_prefix for q in questions):
        mine = [q for q in questions if q.answer_prefix == prefix]
        with torch.inference_mode():
            out = pipe(
                questions[0].context,
                questions=[SEPARATOR + q.question for q in mine],
                answer_prefix=prefix,
                press=press,
                max_new_tokens=max(q.max_new_tokens for q in questions),
            )
        got.update({q.id: a.strip() for q, a in zip(mine, out["answers"], strict=True)})
    return [got[q.id] for q in questions]


def pipeline_check(ctx: PressContext, cell: Cell, record: dict) -> dict:
    """The pipeline's answers for the part next to the runner's, and whether each matches."""
    got = pipeline_answers(ctx.model, ctx.lm.tokenizer, ctx.questions, ctx.press(cell))
    ours = [row["output"] for row in record["samples"]]
    return {"answers": got, "matches": [a == b for a, b in zip(got, ours, strict=True)]}


# ---------------------------------------------------------------------------------------------- the sweep


def select(
    samples: Sequence[Sample], tasks: set[str], lengths: set[int], n_contexts: int | None
) -> dict[tuple[str, int, int], list[list[Sample]]]:
    """Per (task, length, seed), its first ``n_contexts`` contexts (all when None), the questions of each; the
    calibration seed is left out (its gate is headwise's full cache)."""
    groups: dict[tuple[str, int, int], list[Sample]] = {}
    for s in samples:
        if s.seed != CALIBRATION_SEED and (not tasks or s.task in tasks) and (not lengths or s.length in lengths):
            groups.setdefault((s.task, s.length, s.seed), []).append(s)
    return {g: contexts(group)[:n_contexts] for g, group in groups.items()}


def sweep(
    lm: LoadedModel,
    specs: dict[str, PressSpec],
    work: dict[tuple[str, int, int], list[list[Sample]]],
    presses: Sequence[str],
    ratios: Sequence[float],
    store: Path,
    *,
    allow_mixed: bool = False,
    check_pipeline: bool = False,
) -> list[dict]:
    """Run every part not yet in ``store`` through headwise's sweep (:func:`headwise.bench.runner.sweep`: the
    no-press cell first on each context, each record appended as it is done), with kvpress building the caches."""
    cells = [c for (task, length, seed), group in work.items()
             for c in plan_cells(lm.name, specs, presses, ratios, task, length, len(group), seed, lm.dtype)]

    def extra(ctx: Context, cell: Cell, record: dict) -> dict:
        fields = press_fields(ctx, cell, record)
        if check_pipeline and cell.method != FULL:
            fields["pipeline_check"] = pipeline_check(ctx, cell, record)
        return fields

    peer = runner.Peer(LIBRARY, fingerprint(), provenance(), lambda questions: PressContext(lm, questions, specs),
                       extra)
    return runner.sweep(lm, cells, lambda t, n, seed: [q for c in work[(t, n, seed)] for q in c], store,
                        allow_mixed=allow_mixed, peer=peer)


# ---------------------------------------------------------------------------------------------- command line


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def peer_model(name: str, dtype: str = "float32") -> LoadedModel:
    """A model as headwise loads it, in ``dtype``: its dequantized folder under headwise's cache when there is one
    (no need for the registry package in this venv), else by name or path."""
    folder = cached_folder(name)
    return load_model(str(folder) if (folder / "config.json").exists() else name, dtype=dtype)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    p.add_argument("--tasks", type=Path, help="folder of task JSONL files (headwise bench --tasks-only)")
    p.add_argument(
        "--presses",
        default=",".join(DEFAULT_PRESSES),
        help="comma-separated press names (see --list-presses); the no-press cell 'full' always runs",
    )
    p.add_argument("--ratios", default="0.5,0.75,0.9", help="comma-separated fractions of the context KV removed")
    p.add_argument("--task-names", default="", help="comma-separated tasks to keep (default: all in the folder)")
    p.add_argument("--lengths", default="", help="comma-separated lengths to keep (default: all)")
    p.add_argument("--contexts", type=int, default=None, help="at most this many contexts per task and length")
    p.add_argument("--model", default="smollm2-135m", help="model name (its folder under headwise's cache) or path")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/kvpress.jsonl"),
        help="results store (appended; parts already in it are skipped)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_dtype_option(p)
    p.add_argument(
        "--allow-mixed-versions",
        action="store_true",
        help="add to a store that holds kvpress results of another fingerprint",
    )
    p.add_argument(
        "--check-pipeline",
        action="store_true",
        help="also run KVPressTextGenerationPipeline on "
        "every part (all its questions at once) and record whether its answers equal the runner's",
    )
    p.add_argument("--list-presses", action="store_true", help="print the known presses and exit")
    p.add_argument("--dry-run", action="store_true", help="list the parts to run and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    specs = press_specs()
    if args.list_presses:
        for s in specs.values():
            flags = "  (masks entries, keeps full-size tensors)" if s.masks_only else ""
            print(
                f"{s.name:25s} {s.peer_class:38s} {json.dumps(press_options(s.build(0.5)))}{flags}"
                f"{'  ' + s.note if s.note else ''}"
            )
        return 0
    presses, ratios = csv_list(args.presses), [float(r) for r in csv_list(args.ratios)]
    try:
        if args.tasks is None or not args.tasks.is_dir():
            raise HeadwiseError("--tasks must be a folder of task files (headwise bench --tasks-only)")
        unknown = sorted(set(presses) - set(specs) - {FULL})
        if unknown:
            raise HeadwiseError(f"unknown presses {unknown}; known: {', '.join(specs)}")
        if not ratios or any(not 0 < r < 1 for r in ratios):
            raise HeadwiseError(f"ratios must lie in (0, 1), got {ratios}")
        if args.threads < 1:
            raise HeadwiseError(f"--threads must be at least 1, got {args.threads}")
        samples = [s for path in sorted(args.tasks.glob("*.jsonl")) for s in read_samples(path)]
        work = select(samples, set(csv_list(args.task_names)), {int(n) for n in csv_list(args.lengths)}, args.contexts)
        if not work:
            raise HeadwiseError(f"no samples selected in {args.tasks}")
    except HeadwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    presses = [p for p in presses if p != FULL]
    if args.dry_run:
        done = {r["key"] for r in read_records(args.out)}
        for (task, length, seed), group in work.items():
            for cell in plan_cells(args.model, specs, presses, ratios, task, length, len(group), seed,
                                   resolve_dtype(args.dtype)):
                todo = sum(cell.part_key(q[0].context_id, context_digest(q)) not in done for q in group)
                print(
                    f"{cell.method:25s} {cell.ratio:<5g} {task}-{length}-s{seed}: {todo}/{len(group)} contexts to run"
                )
        return 0
    torch.set_num_threads(args.threads)
    logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzip warns of its cost at every construction
    lm = peer_model(args.model, args.dtype)
    start = time.perf_counter()
    records = sweep(
        lm,
        specs,
        work,
        presses,
        ratios,
        args.out,
        allow_mixed=args.allow_mixed_versions,
        check_pipeline=args.check_pipeline,
    )
    print(f"{len(records)} parts in {time.perf_counter() - start:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
