"""Run the benchmark: method x ratio x task x length (x protocol) cells, each appended to the results store.

Protocol (per sample)
---------------------
The prompt is ``context + "\\n\\n" + question``; instruct models get it inside their chat template (the full
chat prompt is rendered once, then split into the text up to the end of the context and the rest: the
question and the template's suffix). The two parts are tokenized separately, so both protocols see the
very same token ids.

``agnostic`` (default)
    the context part is prefilled (in chunks when asked) into the compressed cache, which compresses after
    each multi-token forward; then ``cache.seal()`` stops compression, the question part is fed, and the
    answer is decoded greedily. One compressed context could serve any question.
``aware``
    the whole prompt, question included, is prefilled and compressed, then sealed and decoded.

The full cache (method ``full``, ratio 0) is run once per task and length as the baseline, under the
``agnostic`` protocol: without compression both protocols compute the same thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import Cache

import headwise
from headwise.api import make_cache, make_plan
from headwise.bench.scoring import score
from headwise.bench.store import append_record, completed_keys, repair
from headwise.bench.tasks import SEPARATOR, Sample
from headwise.checks import check_chunk_size
from headwise.errors import HeadwiseError
from headwise.generation import Sampling, build_prompt, cache_bytes, decode, prefill, stop_token_ids
from headwise.memory import PeakRSS
from headwise.models import LoadedModel

PROTOCOLS = ("agnostic", "aware")
FULL = "full"
LIBRARY = "headwise"


@dataclass(frozen=True)
class Cell:
    """One point of the sweep; its :meth:`key` identifies its record in the results store."""

    model: str
    method: str
    ratio: float
    task: str
    length: int
    protocol: str
    n_samples: int
    seed: int
    options: dict = field(default_factory=dict)
    chunk_size: int | None = None

    def key(self) -> str:
        """Hash of every field that changes the result (model, method, options, ratio, task, ...)."""
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def check_method_options(methods: Sequence[str], ratios: Sequence[float], options: dict[str, dict]) -> None:
    """Refuse options for a method that is not run (or is the ``full`` baseline, which takes none), and build
    each compressing method's plan at every ratio so that a bad option fails now, not mid-sweep."""
    if options.get(FULL):
        raise HeadwiseError(f"method '{FULL}' is the uncompressed baseline: it takes no options")
    stray = sorted(set(options) - set(methods) - {FULL})
    if stray:
        raise HeadwiseError(
            f"options given for method(s) {', '.join(stray)}, which are not in the methods run ({', '.join(methods)})"
        )
    for method in methods:
        for ratio in ratios:
            if method != FULL:
                make_plan(method, ratio=ratio, options=options.get(method, {}))


def plan_cells(
    model: str,
    methods: Sequence[str],
    ratios: Sequence[float],
    tasks: Sequence[str],
    lengths: Sequence[int],
    *,
    protocols: Sequence[str] = ("agnostic",),
    n_samples: int,
    seed: int,
    options: dict[str, dict] | None = None,
    chunk_size: int | None = None,
) -> list[Cell]:
    """The cells of a sweep: per task and length, the full-cache baseline then every method x ratio x protocol.

    Everything is checked first, with no model: protocols, ratios, the chunk size, and each method's options
    (by building its plan at every ratio); options for a method that is not run are refused.
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise HeadwiseError(f"unknown protocol(s) {unknown}: use {', '.join(PROTOCOLS)}")
    bad = [r for r in ratios if not 0 <= r < 1]
    if bad:
        raise HeadwiseError(f"ratios must lie in [0, 1), got {bad}")
    if n_samples < 1:
        raise HeadwiseError(f"the number of samples must be at least 1, got {n_samples}")
    check_chunk_size(chunk_size)
    options = options or {}
    check_method_options(methods, ratios, options)
    common = dict(model=model, n_samples=n_samples, seed=seed, chunk_size=chunk_size)
    cells = []
    for task in tasks:
        for length in lengths:
            cells.append(Cell(method=FULL, ratio=0.0, task=task, length=length, protocol="agnostic", **common))
            cells += [
                Cell(method=m, ratio=r, task=task, length=length, protocol=p, options=options.get(m, {}), **common)
                for m in methods
                if m != FULL
                for r in ratios
                if r > 0
                for p in protocols
            ]
    return cells


# ---------------------------------------------------------------------------------------------- one sample


def prompt_parts(lm: LoadedModel, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids of the prompt split after the context: (context part, question part + template suffix)."""
    tok = lm.tokenizer
    if lm.instruct and getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": sample.prompt}], add_generation_prompt=True, tokenize=False
        )
        if sample.context not in rendered:
            raise HeadwiseError(f"{lm.name}'s chat template altered the context of {sample.id}; cannot split it")
        end = rendered.index(sample.context) + len(sample.context)
        head = tok(rendered[:end], add_special_tokens=False)["input_ids"]
        return list(head), list(tok(rendered[end:], add_special_tokens=False)["input_ids"])
    head = build_prompt(lm, sample.context, chat=False)
    return head, list(tok(SEPARATOR + sample.question + "\nAnswer:", add_special_tokens=False)["input_ids"])


def new_cache(lm: LoadedModel, cell: Cell, prompt_length: int | None) -> Cache:
    """The headwise cache for a cell (``full`` is headwise's uncompressed path, so every method shares it)."""
    return make_cache(lm.model, cell.method, ratio=cell.ratio, prompt_length=prompt_length, options=cell.options)


def check_fit(lm: LoadedModel, cells: Iterable[Cell]) -> None:
    """Build one cache per method and options of ``cells``, so that a method that does not fit the model (a
    head profile made for another model) is refused before any cell runs."""
    built: set[tuple[str, str]] = set()
    for cell in cells:
        key = (cell.method, json.dumps(cell.options, sort_keys=True))
        if key not in built:
            built.add(key)
            new_cache(lm, cell, None)


def _seal(cache: Cache) -> None:
    seal = getattr(cache, "seal", None)
    if seal is not None:
        seal()


def run_sample(lm: LoadedModel, sample: Sample, cell: Cell) -> dict:
    """Answer one sample under the cell's method, ratio and protocol; return its score and costs."""
    head, tail = prompt_parts(lm, sample)
    total = len(head) + len(tail) + sample.max_new_tokens
    if total > lm.info.context_length:
        raise HeadwiseError(
            f"sample {sample.id} needs {total} tokens but {lm.name}'s context is {lm.info.context_length}; "
            "use a shorter length"
        )
    if cell.protocol == "aware":
        head, tail = head + tail, []
    cache = new_cache(lm, cell, len(head))
    with PeakRSS() as mem:
        start = time.perf_counter()
        logits = prefill(lm.model, torch.tensor([head]), cache, chunk_size=cell.chunk_size)
        prefill_seconds = time.perf_counter() - start
        kv = cache_bytes(cache)
        _seal(cache)
        start = time.perf_counter()
        if tail:
            logits = prefill(lm.model, torch.tensor([tail]), cache)
        question_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tokens = decode(lm.model, logits, cache, max_new_tokens=sample.max_new_tokens, sampling=Sampling(),
                        stop_ids=stop_token_ids(lm))
        decode_seconds = time.perf_counter() - start
    output = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return {
        "id": sample.id, "depth": sample.depth, "needle_depth": sample.needle_depth,
        "score": score(sample.scoring, output, sample.answers), "output": output, "answers": sample.answers,
        "prompt_tokens": len(head) + len(tail), "kv_bytes": kv, "prefill_seconds": prefill_seconds,
        "question_seconds": question_seconds,
        "decode_tokens_per_second": (len(tokens) - 1) / decode_seconds if decode_seconds > 0 else 0.0,
        "peak_rss": mem.peak, "peak_rss_delta": mem.delta,
    }


# ---------------------------------------------------------------------------------------------- one cell


def _mean(rows: Sequence[dict], name: str) -> float:
    return sum(r[name] for r in rows) / len(rows)


def git_commit() -> str | None:
    """The commit of the headwise checkout, or None outside a git work tree."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(headwise.__file__).parent, capture_output=True, text=True,
            timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance() -> dict:
    """Versions, git commit and machine facts carried by every record."""
    import transformers

    return {
        "library": LIBRARY,
        "versions": {"headwise": headwise.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }


def run_cell(lm: LoadedModel, samples: Sequence[Sample], cell: Cell) -> dict:
    """Run every sample of a cell and summarize it as a results record (without provenance)."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = [run_sample(lm, s, cell) for s in samples]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "key": cell.key(), **asdict(cell),
        "score": _mean(rows, "score"), "kv_bytes": _mean(rows, "kv_bytes"),
        "peak_rss": max(r["peak_rss"] for r in rows), "peak_rss_delta": max(r["peak_rss_delta"] for r in rows),
        "prefill_seconds": _mean(rows, "prefill_seconds"), "question_seconds": _mean(rows, "question_seconds"),
        "decode_tokens_per_second": _mean(rows, "decode_tokens_per_second"),
        "token_length": _mean(rows, "prompt_tokens"), "wall_seconds": wall, "cpu_seconds": cpu,
        "samples": rows,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def sweep(
    lm: LoadedModel,
    cells: Iterable[Cell],
    samples_for: Callable[[str, int], Sequence[Sample]],
    store: Path,
    *,
    progress: bool = True,
) -> list[dict]:
    """Run the cells not yet in ``store``, appending each record as soon as it is done; return the new records.

    ``samples_for(task, length)`` gives a cell's samples. Interrupt at any time: re-running the same sweep
    runs only what is missing. First the store's torn lines are moved aside (:func:`headwise.bench.store.repair`)
    and one cache per method is built, so a method that does not fit the model fails before any cell runs.
    """
    from tqdm.auto import tqdm

    repair(store)
    done = completed_keys(store)
    todo = [c for c in cells if c.key() not in done]
    check_fit(lm, todo)
    meta = provenance()
    records = []
    bar = tqdm(todo, desc="bench", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(f"{cell.task} {cell.length} {cell.method} {cell.ratio:g} {cell.protocol}")
        record = {**run_cell(lm, samples_for(cell.task, cell.length), cell), **meta}
        append_record(store, record)
        records.append(record)
    return records
