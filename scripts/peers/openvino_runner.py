"""Peer runner: OpenVINO GenAI's KV-cache eviction on headwise's benchmark tasks, question-aware, as headwise records.

Runs inside ``.venv-openvino`` (``bash scripts/peers/setup_openvino.sh`` makes it: openvino-genai 2026.4.1,
optimum-intel, headwise editable, and the model's OpenVINO IR exported once, fp32 weights, from headwise's
dequantized folder)::

    .venv/bin/headwise bench --tasks-only --out runs/bench --tasks passkey,qa --lengths 2048
    .venv-openvino/bin/python scripts/peers/openvino_runner.py --tasks runs/bench/tasks --ratios 0.5,0.75,0.9 \\
        --threads 1 --out results/openvino-2048.jsonl
    .venv/bin/headwise bench --out runs/bench --tasks passkey,qa --lengths 2048 --methods snapkv \\
        --ratios 0.5,0.75,0.9 --protocol aware --threads 1          # headwise's side, question-aware
    .venv/bin/headwise bench --report-only --out runs/bench --include results/openvino-2048.jsonl

What is headwise's
------------------
The task files and their prompts (:func:`headwise.bench.protocol.context_parts`: the chat template, cut after the
context, both pieces tokenized by headwise, so OpenVINO is given the very token ids headwise's methods see), the
scoring (:func:`headwise.bench.scoring.score`), the sweep (:func:`headwise.bench.runner.sweep`: the full cache
first on each context, one record per cell x context appended as it is done, resumable, the fingerprint check,
provenance, the progress bar) and the part record (:func:`headwise.bench.runner.part_record`), the model loader
and the selection of contexts (the calibration seed left out: the gate is headwise's full cache). Records carry
``library: "openvino"``, so ``headwise bench --report-only --include FILE`` puts them in the same tables.

What is OpenVINO's
------------------
Each question's whole prompt (context, question and template) goes to OpenVINO GenAI's continuous-batching
pipeline (``ContinuousBatchingPipeline`` on the IR, CPU) in one ``generate`` call, greedy, stopping at headwise's
stop ids: method ``full`` without eviction, and ``openvino_eviction`` with ``SchedulerConfig.use_cache_eviction``
and a ``CacheEvictionConfig(start_size, recent_size, max_cache_size, aggregation_mode)``. As its source
(``continuous_batching/pipeline_impl.cpp``, ``cache/cache_eviction.cpp``) and documentation
(``kvcache-eviction-algorithm.md``) say, and a trace of its cache use confirms:

- No eviction during prefill: the whole prompt is prefilled densely and held (its peak KV memory is the full
  cache's), and the first answer token is sampled from it. A sequence is evicted from only once it "can generate
  tokens", after the forward pass of the step that feeds the first answer token, so the second answer token is
  also computed with the whole prompt in cache; the cache is cut before the third. A one- or two-token answer
  is therefore the full cache's.
- The first eviction ranks the prompt by the attention each position gets from the last ``snapkv_window_size``
  (8) prompt tokens, the question's end and the template (SnapKV), and from the first answer token, max-pooled
  over 7 positions and reduced over the heads of a layer (one choice per layer, the same for all its KV heads);
  later evictions add the next answer tokens' attention (H2O; ``NORM_SUM`` divides a token's sum by its time in
  cache). The first ``start_size`` tokens and the
  last ``recent_size`` (plus the block being filled) are never evicted; positions are not re-rotated
  (``apply_rotation`` False, its default), so kept keys keep their positions, as headwise's do.
- Eviction is by whole blocks of 32 tokens on CPU (``cpu_block_size`` in ``cache/kv_cache_manager.hpp``; a
  ``start_size`` of 16 is refused with "must be a multiple of block size 32"), and all three sizes must be
  multiples of the block.

The budget and its rounding
---------------------------
headwise's ratio is the fraction of the prompt's KV removed, so OpenVINO is asked to keep ``(1 - ratio) x P`` of
the ``P`` prompt tokens. When it evicts, a sequence of ``L`` tokens keeps ``max_cache_size + L mod 32`` of them
(whole blocks leave the middle; the last, partly filled block stays), or all ``L`` when there are too few to
evict. At its first eviction ``L = P + 1`` (the prompt and the first answer token), so the runner picks the
multiple of 32 for ``max_cache_size`` whose first eviction keeps the number of prompt tokens nearest the request
(:func:`budget`; the smaller on a tie; at least ``start_size + recent_size + 32``, OpenVINO's smallest). The
prompt tokens kept then lie within 16 of the request (at 1K tokens the kept fraction is within 1.6 points of
``1 - ratio``, at 2K within 0.8), unless the request is below the fewest OpenVINO can keep: three blocks (start,
one evictable, recent) and the tokens of the last, partly filled one, 96 to 127 tokens with the default sizes.
A 922-token prompt at 90% removed asks for 92 and keeps 122 (13.2%); at 2K tokens 90% is reachable. Each answer
records the request (``requested_kept``), ``max_cache_size`` and the prompt tokens kept (``kept_tokens``). While
it answers, the cache grows by the answer's tokens and is cut back by one block whenever a block past the recent
area fills (so it stays below ``max_cache_size + 32``).

Memory and precision
--------------------
``kv_bytes`` is the blocks held right after the first eviction (the kept prompt tokens and the first answer
token, in whole blocks; for ``full``, the prompt's), times the bytes of one block over all layers as OpenVINO's
pipeline metrics report them (``kv_cache_size_in_bytes`` over the blocks it was given): computed from the
budget, not read back (``kv_bytes_basis``); ``kv_bytes_peak`` is the prompt's blocks, held before the first
eviction; ``kv_blocks_end`` per answer is read back from the pipeline's metrics after its last step. OpenVINO
runs its IR (fp32 weights) at the CPU plugin's default inference precision, recorded per part
(``INFERENCE_PRECISION_HINT``: f32 on a CPU without avx512_bf16 or AMX, bf16 with them), which names the cells'
``dtype``; its paged KV cache holds 2 bytes per element by default here, a 16-bit type (the core's
``KV_CACHE_PRECISION`` property reads u8, but the pipeline's blocks shrink to 0.59 of their size only when u8 is
passed to it): ``kv_element_bytes`` records what its metrics imply. headwise holds float32 KV (4 bytes) at
``--dtype float32``.

Fidelity is not measured: OpenVINO's pipeline cannot teacher-force a given answer through its evicted cache
(an answer fed as prompt is prefilled and never evicted), so ``nll``, ``top1`` and ``nll_full`` are null and the
report leaves those columns empty. ``same_as_full`` says whether an answer's token ids equal OpenVINO's full
cache's.

Speed, side by side
-------------------
Per answer: OpenVINO's time to first token (its prefill of the whole prompt, ``prefill_seconds`` of the part and
``question_seconds`` of the answer) and decode tokens per second (one over its mean time per output token,
eviction included; 0 for a one-token answer), both from its ``perf_metrics``; and right after it, headwise's full
cache on the same prompt ids (:func:`headwise.bench.protocol.answer` on an empty cache: its prefill and greedy
decode, the model at ``--dtype``): ``headwise_prefill_seconds``, ``headwise_decode_tokens_per_second``,
``headwise_output``. Both run ``--threads`` threads. Each new OpenVINO pipeline (one per budget, two kept) and
headwise's model are warmed up first with a short prompt. A part's ``wall_seconds`` and ``cpu_seconds`` leave out
the headwise timing beside it (``headwise_wall_seconds``). The summary prints the median ratios.

Results tied to code
--------------------
A cell's key holds every eviction option, the block size and the budget rule (``resolved``) and the fingerprint:
OpenVINO's, OpenVINO GenAI's, transformers' (the tokenizer) and torch's versions, this file,
``openvino_sparse.py`` (the scheduler) and headwise's protocol code. A store holding other OpenVINO results is
refused unless ``--allow-mixed-versions``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from kvpress_runner import PROTOCOL_CODE, csv_list, peer_model, select  # this folder is on a script's path

import headwise
from headwise.bench import protocol, runner
from headwise.bench.calibration import FULL
from headwise.bench.cli import split_list
from headwise.bench.protocol import Answer, answer
from headwise.bench.runner import Cell, Context, Reference, answer_row, context_digest, part_record
from headwise.bench.scoring import score
from headwise.bench.store import pack, read_records
from headwise.bench.tasks import Sample, read_samples
from headwise.checks import add_dtype_option, check_output_file, set_threads
from headwise.errors import HeadwiseError, run_cli
from headwise.generation import stop_token_ids
from headwise.memory import PeakRSS
from headwise.models import LoadedModel, resolve_dtype
from headwise.registry import cached_folder

LIBRARY = "openvino"
METHOD = "openvino_eviction"
#: OpenVINO GenAI's KV block on CPU, in tokens (``cpu_block_size``, continuous_batching/cache/kv_cache_manager.hpp)
BLOCK = 32
BUDGET_RULE = ("max_cache_size: the multiple of block_size whose first eviction (prompt + 1 token) keeps the number "
               "of prompt tokens nearest (1 - ratio) x prompt tokens, the smaller on a tie")
KV_BASIS = "whole blocks held after the first eviction, computed from the budget"
AGGREGATIONS = ("NORM_SUM", "SUM")
#: OpenVINO's element types by the names of headwise's dtypes
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


# ---------------------------------------------------------------------------------------------- the budget


def held_after_eviction(length: int, max_cache_size: int, block: int = BLOCK) -> int:
    """Tokens a sequence of ``length`` tokens holds after OpenVINO evicts from it: ``max_cache_size`` and the
    tokens of its last, partly filled block, or all of them when no whole block can go."""
    return min(max_cache_size + length % block, length)


@dataclass(frozen=True)
class Budget:
    """The eviction budget of one prompt: the prompt tokens asked for, ``max_cache_size`` and the prompt tokens
    OpenVINO keeps at its first eviction."""

    prompt_tokens: int
    requested: float
    max_cache_size: int
    kept: int

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.prompt_tokens


def budget(prompt_tokens: int, ratio: float, start_size: int = BLOCK, recent_size: int = BLOCK,
           block: int = BLOCK) -> Budget:
    """The ``max_cache_size`` (a multiple of ``block`` above ``start_size + recent_size``) whose first eviction,
    at ``prompt_tokens + 1`` tokens, keeps the number of prompt tokens nearest ``(1 - ratio) x prompt_tokens``."""
    requested = (1 - ratio) * prompt_tokens
    length = prompt_tokens + 1
    smallest = start_size + recent_size + block
    exact = (requested + 1 - length % block) / block  # in blocks: the size that would keep the request exactly
    sizes = sorted({max(smallest, block * math.floor(exact)), max(smallest, block * math.ceil(exact))})
    best = min(sizes, key=lambda size: abs(held_after_eviction(length, size, block) - 1 - requested))
    return Budget(prompt_tokens, requested, best, held_after_eviction(length, best, block) - 1)


def blocks(tokens: int, block: int = BLOCK) -> int:
    return -(-tokens // block)


# ---------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class Eviction:
    """What this runner sets of OpenVINO's ``CacheEvictionConfig`` besides ``max_cache_size`` (from the ratio)."""

    start_size: int = BLOCK
    recent_size: int = BLOCK
    aggregation_mode: str = "NORM_SUM"
    apply_rotation: bool = False
    snapkv_window_size: int = 8

    def check(self) -> Eviction:
        for name in ("start_size", "recent_size"):
            size = getattr(self, name)
            if size < BLOCK or size % BLOCK:
                raise HeadwiseError(f"--{name.replace('_', '-')} must be a positive multiple of {BLOCK} "
                                    f"(OpenVINO's KV block on CPU), got {size}")
        if self.aggregation_mode not in AGGREGATIONS:
            raise HeadwiseError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
        if self.snapkv_window_size < 0:
            raise HeadwiseError("--snapkv-window must be at least 0")
        return self

    def resolved(self) -> dict:
        return {**asdict(self), "block_size": BLOCK, "budget": BUDGET_RULE}


def peer_versions() -> dict[str, str]:
    """Versions of the libraries that compute an OpenVINO result (transformers: the tokenizer of the prompts)."""
    return {name: version(name) for name in ("openvino", "openvino-genai", "transformers", "torch", "headwise")}


@cache
def fingerprint() -> str:
    """16 hex digits naming OpenVINO's versions, this file, ``openvino_sparse.py`` and headwise's protocol code."""
    here = Path(__file__).resolve()
    files = [here, here.with_name("openvino_sparse.py"), *(Path(headwise.__file__).parent / f for f in PROTOCOL_CODE)]
    return runner.code_fingerprint(files, peer_versions())


def plan_cells(model: str, eviction: Eviction, ratios: Sequence[float], task: str, length: int, n_contexts: int,
               seed: int, dtype: str) -> list[Cell]:
    """The full cache (no eviction), then eviction at every ratio, question-aware, for one task and length."""
    settings = [(FULL, 0.0, "agnostic", {}), *((METHOD, r, "aware", eviction.resolved()) for r in ratios)]
    return [Cell(model=model, method=method, ratio=ratio, task=task, length=length, protocol=protocol,
                 n_samples=n_contexts, seed=seed, resolved=resolved, fingerprint=fingerprint(), dtype=dtype)
            for method, ratio, protocol, resolved in settings]


# ---------------------------------------------------------------------------------------------- one part


@dataclass(frozen=True)
class Generated:
    """One OpenVINO answer, and the KV blocks its sequence held at its last step (from the pipeline's metrics)."""

    answer: Answer
    blocks_end: int


class Parts:
    """Runs the parts of the sweep on OpenVINO (one pipeline per budget, the last two kept), with headwise's full
    cache timed on the same prompts."""

    def __init__(self, lm: LoadedModel, ir: Path, eviction: Eviction, threads: int, headwise_speed: bool = True):
        self.lm, self.ir, self.eviction, self.threads, self.headwise_speed = lm, ir, eviction, threads, headwise_speed
        self.total_blocks = blocks(lm.info.context_length) + 2
        self.pipes: OrderedDict[int | None, Any] = OrderedDict()
        self.block_bytes = 0.0
        self.settings: dict = {}
        self.aside = [0.0, 0.0]  # wall and CPU seconds spent timing headwise in the part running

    def pipeline(self, max_cache_size: int | None) -> Any:
        """The pipeline evicting down to ``max_cache_size`` (None: no eviction), built and warmed up on first use."""
        if max_cache_size not in self.pipes:
            import openvino as ov
            import openvino_genai as ov_genai
            from openvino_sparse import scheduler_config

            while len(self.pipes) >= 2:
                self.pipes.popitem(last=False)
            e = self.eviction
            eviction = None if max_cache_size is None else ov_genai.CacheEvictionConfig(
                e.start_size, e.recent_size, max_cache_size, getattr(ov_genai.AggregationMode, e.aggregation_mode),
                apply_rotation=e.apply_rotation, snapkv_window_size=e.snapkv_window_size)
            config = scheduler_config(eviction=eviction, blocks=self.total_blocks)
            pipe = ov_genai.ContinuousBatchingPipeline(str(self.ir), config, "CPU",
                                                       {"INFERENCE_NUM_THREADS": self.threads})
            pipe.generate([ov.Tensor(np.arange(100, 164, dtype=np.int64)[None])], [self.config(2)])  # warm-up
            self.block_bytes = pipe.get_metrics().kv_cache_size_in_bytes / self.total_blocks
            self.settings = {"inference_precision": inference_precision(),
                             "kv_block_bytes": self.block_bytes, "kv_element_bytes": self.element_bytes(),
                             "block_size": BLOCK, "threads": self.threads, "ir": str(self.ir)}
            self.pipes[max_cache_size] = pipe
        self.pipes.move_to_end(max_cache_size)
        return self.pipes[max_cache_size]

    def element_bytes(self) -> float:
        """Bytes per element of OpenVINO's KV blocks: a block's bytes over its keys and values of every layer."""
        cfg = self.lm.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return self.block_bytes / (BLOCK * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2)

    def config(self, max_new_tokens: int) -> Any:
        from openvino_sparse import greedy

        config = greedy(max_new_tokens)
        config.stop_token_ids = stop_token_ids(self.lm)
        return config

    def generate(self, pipe: Any, ids: list[int], sample: Sample) -> Generated:
        """OpenVINO's greedy answer to the whole prompt ``ids``, scored, with its time to first token and decode
        speed from its ``perf_metrics``."""
        import openvino as ov

        result = pipe.generate([ov.Tensor(np.array([ids], dtype=np.int64))], [self.config(sample.max_new_tokens)])[0]
        tokens = [int(t) for t in result.m_generation_ids[0]]
        text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        metrics = result.perf_metrics
        rate = 1000 / metrics.get_tpot().mean if len(tokens) > 1 and metrics.get_tpot().mean > 0 else 0.0
        got = Answer(tokens, text, score(sample.scoring, text, sample.answers), metrics.get_ttft().mean / 1000, rate)
        return Generated(got, round(pipe.get_metrics().cache_usage * self.total_blocks / 100))

    def headwise(self, ids: list[int], sample: Sample) -> dict:
        """headwise's full cache on the same prompt: its prefill seconds, decode speed and answer."""
        if not self.headwise_speed:
            return {}
        from headwise.api import make_cache

        wall, cpu = time.perf_counter(), time.process_time()
        got = answer(self.lm, make_cache(self.lm.model, FULL), ids, sample)
        self.aside[0] += time.perf_counter() - wall
        self.aside[1] += time.process_time() - cpu
        return {"headwise_prefill_seconds": got.question_seconds,
                "headwise_decode_tokens_per_second": got.decode_tokens_per_second, "headwise_output": got.text}

    def warm_up(self, sample: Sample) -> None:
        """The start of ``sample``'s prompt through headwise's model, two tokens decoded, so that the first timed
        prefill pays no first-call costs."""
        head, _ = protocol.prompt_parts(self.lm, sample)
        self.headwise(head[:64], replace(sample, max_new_tokens=2))

    def __call__(self, ctx: Context, cell: Cell, references: dict[str, Reference]) -> dict:
        """Answer every question of ``ctx`` under ``cell``, one whole prompt at a time: the part's record."""
        started = time.perf_counter(), time.process_time()
        rows, built, self.aside = [], [], [0.0, 0.0]
        with PeakRSS() as mem:
            for sample, tail in zip(ctx.questions, ctx.tails, strict=True):
                ids = ctx.head + tail
                plan = None if cell.is_reference else budget(len(ids), cell.ratio, self.eviction.start_size,
                                                             self.eviction.recent_size)
                out = self.generate(self.pipeline(plan and plan.max_cache_size), ids, sample)
                got = out.answer
                if cell.is_reference:
                    references[sample.id] = Reference(got.tokens, None)
                kept = plan.kept if plan else len(ids)
                built.append((blocks(kept + 1) * self.block_bytes, got.question_seconds, 0.0, 1.0))
                rows.append({**answer_row(sample, got, len(ids), (None, None), None),
                             "requested_kept": plan.requested if plan else len(ids),
                             "max_cache_size": plan.max_cache_size if plan else None, "kept_tokens": kept,
                             "kv_blocks_end": out.blocks_end,
                             "same_as_full": None if cell.is_reference else got.tokens == references[sample.id].tokens,
                             **self.headwise(ids, sample)})
        record = part_record(ctx, cell, rows, built, mem, started)
        record["wall_seconds"] -= self.aside[0]  # OpenVINO's part alone: headwise's timing beside it left out
        record["cpu_seconds"] -= self.aside[1]
        peak = sum(blocks(r["prompt_tokens"] + 1) for r in rows) / len(rows) * self.block_bytes
        return {**record, "kv_bytes_peak": peak, "kv_bytes_basis": KV_BASIS, "openvino": self.settings,
                "peer_method": "none" if cell.is_reference else "CacheEvictionConfig",
                "headwise_dtype": self.lm.dtype, "headwise_wall_seconds": self.aside[0]}


def inference_precision() -> str:
    """The CPU plugin's default inference precision, in headwise's dtype names (``f32`` -> float32)."""
    import openvino as ov

    name = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    return DTYPES.get(name, name)


# ---------------------------------------------------------------------------------------------- the sweep


def provenance(threads: int) -> dict:
    base = runner.provenance()
    return {**base, "library": LIBRARY, "versions": peer_versions(),
            "machine": {**base["machine"], "openvino_threads": threads}}


def sweep(parts: Parts, work: dict[tuple[str, int, int], list[list[Sample]]], ratios: Sequence[float], store: Path,
          dtype: str, *, allow_mixed: bool = False, progress: bool = True) -> list[dict]:
    """Every part of ``work`` not yet in ``store`` through headwise's sweep, with OpenVINO answering."""
    lm = parts.lm
    cells = [c for (task, length, seed), group in work.items()
             for c in plan_cells(lm.name, parts.eviction, ratios, task, length, len(group), seed, dtype)]
    peer = runner.Peer(LIBRARY, fingerprint(), provenance(parts.threads),
                       lambda questions: Context(lm, questions, share_prefill=False), lambda *_: {}, parts)
    return runner.sweep(lm, cells, lambda t, n, seed: [q for c in work[(t, n, seed)] for q in c], store,
                        allow_mixed=allow_mixed, progress=progress, peer=peer)


def summary(records: Sequence[dict]) -> str:
    """Per method and ratio: answers, mean score, the prompt fraction kept, and the median speed ratios of
    OpenVINO to headwise's full cache on the same prompts (prefill: headwise's seconds over OpenVINO's; decode:
    OpenVINO's tokens per second over headwise's)."""
    lines = ["method             ratio  answers  score  kept   prefill speed OV:hw  decode speed OV:hw"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["ratio"]), []).extend(r["samples"])
    for (method, ratio), rows in sorted(groups.items(), key=lambda g: g[0][1]):
        kept = statistics.mean(s["kept_tokens"] / s["prompt_tokens"] for s in rows)
        prefill = [s["headwise_prefill_seconds"] / s["question_seconds"] for s in rows
                   if s.get("headwise_prefill_seconds") and s["question_seconds"]]
        decode = [s["decode_tokens_per_second"] / s["headwise_decode_tokens_per_second"] for s in rows
                  if s.get("headwise_decode_tokens_per_second") and s["decode_tokens_per_second"]]
        speed = [f"{statistics.median(v):.2f}x" if v else "n/a" for v in (prefill, decode)]
        lines.append(f"{method:18s} {ratio:<6g} {len(rows):<8d} {statistics.mean(s['score'] for s in rows):.3f}  "
                     f"{kept:.3f}  {speed[0]:20s} {speed[1]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def ir_folder(model: str) -> Path:
    """The model's IR, next to its dequantized folder under headwise's cache (or next to a model path)."""
    folder = cached_folder(model)
    return Path(f"{folder if (folder / 'config.json').exists() else Path(model)}-openvino")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    p.add_argument("--tasks", type=Path, required=True, help="folder of task JSONL files (headwise bench --tasks-only)")
    p.add_argument("--ratios", default="0.5,0.75,0.9", help="comma-separated fractions of the prompt's KV removed")
    p.add_argument("--task-names", default="", help="comma-separated tasks to keep (default: all in the folder)")
    p.add_argument("--lengths", default="", help="comma-separated lengths to keep (default: all)")
    p.add_argument("--contexts", type=int, default=None, help="at most this many contexts per task and length")
    p.add_argument("--model", default="smollm2-135m", help="model name (its folder under headwise's cache) or path")
    p.add_argument("--out", type=Path, default=Path("results/openvino.jsonl"),
                   help="results store (appended; parts already in it are skipped)")
    p.add_argument("--threads", type=int, default=1, help="OpenVINO and torch threads (default 1)")
    add_dtype_option(p)
    p.add_argument("--start-size", type=int, default=BLOCK, help=f"tokens never evicted at the start ({BLOCK})")
    p.add_argument("--recent-size", type=int, default=BLOCK, help=f"tokens never evicted at the end ({BLOCK})")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="NORM_SUM", help="OpenVINO's score aggregation")
    p.add_argument("--snapkv-window", type=int, default=8, help="prompt tokens whose attention ranks the prompt (8)")
    p.add_argument("--apply-rotation", action="store_true", help="re-rotate kept keys after each eviction")
    p.add_argument("--no-headwise-speed", action="store_true", help="do not time headwise's full cache beside it")
    p.add_argument("--allow-mixed-versions", action="store_true",
                   help="add to a store that holds OpenVINO results of another fingerprint")
    p.add_argument("--dry-run", action="store_true", help="list the parts to run and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ratios = split_list(args.ratios, float, "ratio")
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise HeadwiseError(f"ratios must lie in (0, 1), got {args.ratios!r}")
    if args.threads < 1:
        raise HeadwiseError(f"--threads must be at least 1, got {args.threads}")
    eviction = Eviction(args.start_size, args.recent_size, args.aggregation, args.apply_rotation,
                        args.snapkv_window).check()
    if not args.tasks.is_dir():
        raise HeadwiseError(f"--tasks must be a folder of task files (headwise bench --tasks-only): {args.tasks}")
    samples = [s for path in sorted(args.tasks.glob("*.jsonl")) for s in read_samples(path)]
    work = select(samples, set(csv_list(args.task_names)), set(split_list(args.lengths, int, "length")), args.contexts)
    if not work:
        raise HeadwiseError(f"no samples selected in {args.tasks}")
    check_output_file(args.out)
    ir = ir_folder(args.model)
    if not (ir / "openvino_model.xml").exists():
        raise HeadwiseError(f"no OpenVINO IR at {ir}: run bash scripts/peers/setup_openvino.sh")
    dtype = inference_precision()
    if args.dry_run:
        done = {r["key"] for r in read_records(args.out)}
        for (task, length, seed), group in work.items():
            for cell in plan_cells(args.model, eviction, ratios, task, length, len(group), seed, dtype):
                todo = sum(cell.part_key(q[0].context_id, context_digest(q)) not in done for q in group)
                print(f"{cell.method:18s} {cell.ratio:<5g} {task}-{length}-s{seed}: {todo}/{len(group)} to run")
        return
    set_threads(args.threads)
    lm = peer_model(args.model, resolve_dtype(args.dtype))
    parts = Parts(lm, ir, eviction, args.threads, headwise_speed=not args.no_headwise_speed)
    parts.warm_up(next(iter(work.values()))[0][0])
    start = time.perf_counter()
    records = sweep(parts, work, ratios, args.out, dtype, allow_mixed=args.allow_mixed_versions,
                    progress=not args.no_progress)
    pack(args.out)
    print(f"{len(records)} parts in {time.perf_counter() - start:.0f}s -> {args.out}")
    mine = [r for r in read_records(args.out) if r.get("library") == LIBRARY and r.get("fingerprint") == fingerprint()]
    if mine:
        print(summary(mine))


if __name__ == "__main__":
    sys.exit(run_cli(main, "openvino_runner.py"))
