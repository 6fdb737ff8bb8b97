"""Run the benchmark: method x ratio x task x length (x protocol) cells, stored one context at a time.

The protocol (prompt split, greedy answers, scoring, fidelity) is :mod:`headwise.bench.protocol`, shared
with the peer runners. A cell's samples come context by context; every context has one or more questions.
What is stored is a *part*: one cell on one context (see :mod:`headwise.bench.store`), so an interrupted
sweep loses at most the part in flight.

Per context
-----------
1. The full cache (method ``full``, ratio 0) answers every question first; its greedy answers are the
   references for fidelity.
2. Every other cell builds its compressed cache and answers each question on its own deep copy of the
   sealed cache (question-agnostic), and teacher-forces the full cache's answer on another copy: the
   answer's NLL and top-1 agreement, next to the task score.

One dense prefill per context serves every cell whose cache depends only on it: question-agnostic cells
prefilled in one forward (no ``chunk_size``). The context is prefilled once without compression and each
cell's cache is built from the captured tensors (:mod:`headwise.dense`, proven equal to the direct path);
``prefill_seconds`` of such a part is the shared dense forward plus its own compression. Chunked prefill and
the ``aware`` protocol take the direct path. ``aware`` compresses, per question, the whole prompt but its last
token, then seals the cache and feeds that token (one prefill per question).

Calibration gate
----------------
The sweep also runs the full cache on a calibration seed (never a reported seed): a task counts toward the
headline at a model and length only if the full cache scores at least
:data:`headwise.bench.calibration.GATE` there. Those cells have ``calibration: true``;
:func:`headwise.bench.calibration.gate` reads the result back from the records.

Results tied to code
--------------------
A cell's key hashes its resolved options (every policy and plan field, defaults included, and the content of
an input file such as a head profile) and a fingerprint of the code and versions that compute results
(:func:`fingerprint`). A sweep refuses a store written by another fingerprint unless told to mix them.
"""

from __future__ import annotations

import ast
import dataclasses
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
from functools import cache
from pathlib import Path

import torch
from transformers import Cache

import headwise
from headwise import dense
from headwise.api import PLAN_OPTIONS, make_cache, make_plan
from headwise.bench.calibration import CALIBRATION_SEED, FULL
from headwise.bench.protocol import Answer, answer, context_parts, follow, reconstruction_parts
from headwise.bench.store import append_record, read_records, repair, unpack
from headwise.bench.tasks import Sample
from headwise.cache import HeadwiseCache, Plan
from headwise.checks import check_chunk_size
from headwise.errors import HeadwiseError
from headwise.explain.needles import needle_kept, needle_positions
from headwise.generation import cache_bytes, prefill
from headwise.memory import PeakRSS
from headwise.models import LoadedModel
from headwise.select import SELECTORS, make_selector
from headwise.sparse.plan import SparsePlan

PROTOCOLS = ("agnostic", "aware")
#: Cell options that change how the prefill attends (``--sparse``, ``--act``): plan arguments, not a policy's
#: options, and a cell with one prefills on its own (the shared dense forward would attend otherwise).
PREFILL_OPTIONS = ("sparse", "act")
LIBRARY = "headwise"
#: Modules that do not change a result: reporting, command lines, profiling (a profile enters a key by its
#: content), input checks and the store itself. Every other module of the package is in the fingerprint.
NOT_FINGERPRINTED = ("report", "profile/cli.py", "profile/profiler.py", "profile/report.py", "profile/metrics.py",
                     "profile/data.py", "capture", "cli.py", "bench/cli.py", "bench/store.py", "bench/intervals.py",
                     "bench/calibration.py", "checks.py", "errors.py", "explain/cli.py", "explain/probe.py",
                     "explain/training.py", "explain/headview", "explain/rollout", "explain/attribution")


# ---------------------------------------------------------------------------------------------- identity


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                                             ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(files: Iterable[Path]) -> str:
    """Hash of the code in ``files``: their syntax trees without docstrings, so comments, docstrings and layout
    do not count."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(ast.dump(_without_docstrings(ast.parse(path.read_text(encoding="utf-8")))).encode())
    return digest.hexdigest()


def fingerprinted_files(root: Path) -> list[Path]:
    """The package's modules that compute results (all but :data:`NOT_FINGERPRINTED`)."""
    return [p for p in root.rglob("*.py")
            if not any(p.relative_to(root).as_posix().startswith(skip) for skip in NOT_FINGERPRINTED)]


def versions() -> dict[str, str]:
    import transformers

    return {"headwise": headwise.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def code_fingerprint(files: Iterable[Path], library_versions: dict[str, str]) -> str:
    """16 hex digits naming the code in ``files`` (:func:`code_digest`) and the libraries' versions: the
    fingerprint of headwise's results and of every peer runner's."""
    blob = json.dumps({"code": code_digest(files), "versions": library_versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@cache
def fingerprint() -> str:
    """16 hex digits naming the code that computes results and the versions of headwise, torch, transformers."""
    return code_fingerprint(fingerprinted_files(Path(headwise.__file__).parent), versions())


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise HeadwiseError(f"cannot read '{path}': {exc}") from exc


def resolved_options(plan: Plan) -> dict:
    """Every option of a plan, defaults included: the policy's fields, the plan options and the mode; an input
    file (``profile``, a sparse plan, act's profile) also by the digest of its content, so a cell's key changes when
    the file does."""
    policy = {f.name: getattr(plan.policy, f.name) for f in dataclasses.fields(plan.policy)}
    if policy.get("profile"):
        policy["profile_sha256"] = _file_digest(policy["profile"])
    select = {"rule": plan.select.name, **dataclasses.asdict(plan.select)} if plan.select else None
    if select and select.get("profile"):
        select["profile_sha256"] = _file_digest(select["profile"])
    sparse = None
    if isinstance(plan.sparse, SparsePlan):
        sparse = {"plan": plan.sparse.file, "sha256": _file_digest(plan.sparse.file)}
    elif plan.sparse is not None:
        sparse = plan.sparse.describe()
    act = {"calibration": plan.act.describe(), "sha256": _file_digest(plan.act.profile)} if plan.act else None
    return {**policy, **{name: getattr(plan, name) for name in PLAN_OPTIONS}, "mode": plan.mode, "select": select,
            **({"sparse": sparse} if sparse else {}), **({"act": act} if act else {})}


@dataclass(frozen=True)
class Cell:
    """One point of the sweep. ``options`` are as given (they build the cache and label the method);
    ``resolved`` are all of them with defaults (:func:`resolved_options`), which the key hashes instead."""

    model: str
    method: str
    ratio: float
    task: str
    length: int
    protocol: str
    n_samples: int
    seed: int
    options: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)
    chunk_size: int | None = None
    calibration: bool = False
    fingerprint: str = ""
    dtype: str = "float32"  # the model's precision (headwise.models.load_model)

    def key(self) -> str:
        """Hash of every field that changes the result, with the resolved options (not as given); float32, the
        precision of every result before ``dtype`` was a field, is left out, so their keys stay the same."""
        identity = {k: v for k, v in asdict(self).items() if k != "options" and (k, v) != ("dtype", "float32")}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:20]

    def part_key(self, context_id: str, digest: str) -> str:
        """Key of this cell's part on one context, named by its id and the :func:`context_digest` of its questions:
        a part run on other task content (other needle depths, say) is never taken for this one."""
        return hashlib.sha256(f"{self.key()}|{context_id}|{digest}".encode()).hexdigest()[:20]

    @property
    def is_reference(self) -> bool:
        """Whether this is the full cache with dense prefill, whose answers every other cell is measured against."""
        return self.method == FULL and not self.options

    @property
    def shares_prefill(self) -> bool:
        """Whether the cache can be built from a shared dense prefill (:mod:`headwise.dense`): not with one of
        :data:`PREFILL_OPTIONS`, which attend otherwise than the dense forward."""
        return (self.protocol == "agnostic" and self.chunk_size is None
                and not any(name in self.options for name in PREFILL_OPTIONS))


def plan_arguments(method: str, ratio: float, options: dict) -> dict:
    """What :func:`headwise.api.make_plan` builds a method's plan from: a policy removing ``ratio`` of the cache,
    or a selection rule (:data:`headwise.select.SELECTORS`) over the whole cache whose decoding steps read
    ``1 - ratio`` of it (as many tokens as eviction at that ratio keeps); the option ``sparse`` (``--sparse``)
    adds sparse prefill to either, the option ``act`` (``--act``) attention-sink calibration."""
    options = dict(options)
    extra = {name: options.pop(name, None) for name in PREFILL_OPTIONS}
    if method in SELECTORS:
        return {"policy": FULL, **extra, "select": make_selector(method, {**options, "fraction": round(1 - ratio, 12)})}
    return {"policy": method, "ratio": ratio if method != FULL else None, "options": options, **extra}


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
    calibration_seed: int | None = CALIBRATION_SEED,
    calibration_samples: int | None = None,
    sparse: Sequence[str] = (),
    act: Sequence[str] = (),
    dtype: str = "float32",
) -> list[Cell]:
    """The cells of a sweep: the calibration gate (the full cache on ``calibration_seed``, ``calibration_samples``
    contexts, default ``n_samples``; None: no gate), then per task and length the full cache and every method x
    ratio x protocol, and all of them again with each sparse prefill pattern or plan of ``sparse`` (the option
    ``sparse``), and again with each attention-sink calibration of ``act`` (the option ``act``); the dense full
    cache without calibration stays the reference.

    Everything is checked first, with no model: protocols, ratios, the chunk size, seeds, and each method's
    options (by building its plan at every ratio); options for a method that is not run are refused, and so is a
    method that cannot take a calibration of ``act`` (one built from a dense prefill, a selection rule).
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise HeadwiseError(f"unknown protocol(s) {unknown}: use {', '.join(PROTOCOLS)}")
    bad = [r for r in ratios if not 0 <= r < 1]
    if bad:
        raise HeadwiseError(f"ratios must lie in [0, 1), got {bad}")
    if n_samples < 1 or (calibration_samples is not None and calibration_samples < 1):
        raise HeadwiseError("the number of samples must be at least 1")
    if calibration_seed == seed:
        raise HeadwiseError(f"seed {seed} is the calibration seed: report on another seed")
    check_chunk_size(chunk_size)
    options = options or {}
    if options.get(FULL):
        raise HeadwiseError(f"method '{FULL}' is the uncompressed baseline: it takes no options")
    stray = sorted(set(options) - set(methods) - {FULL})
    if stray:
        raise HeadwiseError(
            f"options given for method(s) {', '.join(stray)}, which are not in the methods run ({', '.join(methods)})"
        )
    common = dict(model=model, chunk_size=chunk_size, fingerprint=fingerprint(), dtype=dtype)

    def cell(method: str, ratio: float, task: str, length: int, protocol: str, extra: dict | None = None,
             **kw) -> Cell:
        given = {**(options.get(method, {}) if method != FULL else {}), **(extra or {})}
        plan = make_plan(**plan_arguments(method, ratio, given))
        if plan.needs_dense_prefill() and (protocol != "agnostic" or chunk_size is not None or "sparse" in given):
            raise HeadwiseError(f"method '{method}' (a reconstruction of the context, or a global allocation) needs "
                                "a dense prefill: it runs only question-agnostic on a one-forward prefill (no "
                                "--chunk-size, --sparse or aware)")
        return Cell(method=method, ratio=ratio, task=task, length=length, protocol=protocol, options=given,
                    resolved=resolved_options(plan), **common, **kw)

    compressing = [m for m in methods if m != FULL]
    cells = []
    if calibration_seed is not None:
        cells += [cell(FULL, 0.0, t, n, "agnostic", n_samples=calibration_samples or n_samples, seed=calibration_seed,
                       calibration=True) for t in tasks for n in lengths]
    for task in tasks:
        for length in lengths:
            run = dict(task=task, length=length, n_samples=n_samples, seed=seed)
            for extra in [None, *({"sparse": spec} for spec in sparse), *({"act": spec} for spec in act)]:
                cells.append(cell(FULL, 0.0, protocol="agnostic", extra=extra, **run))
                cells += [cell(m, r, protocol=p, extra=extra, **run)
                          for m in compressing for r in ratios if r > 0 for p in protocols]
    return cells


# ---------------------------------------------------------------------------------------------- one context


def context_digest(questions: Sequence[Sample]) -> str:
    """Hash of every field of a context's questions: the context, the questions, answers, depths and prefixes."""
    return hashlib.sha256("\n".join(q.to_json() for q in questions).encode("utf-8")).hexdigest()[:20]


def contexts(samples: Sequence[Sample]) -> list[list[Sample]]:
    """Samples grouped by context, in order."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.context_id, []).append(s)
    return list(groups.values())


def new_cache(lm: LoadedModel, cell: Cell, prompt_length: int | None) -> Cache:
    """The headwise cache for a cell (``full`` is headwise's uncompressed path, so every method shares it)."""
    return make_cache(lm.model, prompt_length=prompt_length, **plan_arguments(cell.method, cell.ratio, cell.options))


def check_fit(lm: LoadedModel, cells: Iterable[Cell]) -> None:
    """Build one cache per method and options of ``cells``, so that a method that does not fit the model (a
    head profile made for another model) is refused before any cell runs."""
    built: set[tuple[str, str]] = set()
    for cell in cells:
        key = (cell.method, json.dumps(cell.options, sort_keys=True))
        if key not in built:
            built.add(key)
            # the cache binds its plan to the model; built directly, since make_cache refuses the plans that
            # only the shared dense prefill builds (kvzip's)
            HeadwiseCache(lm.model.config, make_plan(**plan_arguments(cell.method, cell.ratio, cell.options)))


@dataclass
class Reference:
    """The full cache's greedy answer to one question (token ids) and its own NLL of it."""

    tokens: list[int]
    nll: float


class Context:
    """One context and its questions, with the dense prefill built on first use and shared by the cells."""

    def __init__(self, lm: LoadedModel, questions: Sequence[Sample], *, share_prefill: bool = True) -> None:
        self.lm = lm
        self.share_prefill = share_prefill
        self.questions = list(questions)
        self.id = questions[0].context_id
        self.digest = context_digest(questions)
        self.head, self.tails = context_parts(lm, questions)
        self._dense: dense.DenseContext | None = None
        self.dense_seconds = 0.0
        self._reconstruction: tuple[torch.Tensor | None, ...] | None = None
        self.reconstruction_seconds = 0.0

    def dense(self) -> dense.DenseContext:
        if self._dense is None:
            start = time.perf_counter()
            self._dense = dense.capture(self.lm.model, torch.tensor([self.head]))
            self.dense_seconds = time.perf_counter() - start
        return self._dense

    def reconstruction(self) -> tuple[torch.Tensor | None, ...]:
        """KVzip's reconstruction attention of the context (:func:`headwise.dense.reconstruct`), on first use."""
        if self._reconstruction is None:
            start = time.perf_counter()
            request, copy_ids = reconstruction_parts(self.lm, self.questions[0])
            self._reconstruction = dense.reconstruct(self.lm.model, self.dense(), request, copy_ids)
            self.reconstruction_seconds = time.perf_counter() - start
        return self._reconstruction

    def shares(self, cell: Cell) -> bool:
        """Whether ``cell``'s cache is built from the shared dense prefill."""
        return self.share_prefill and cell.shares_prefill

    def compressed(self, cell: Cell, ids: list[int]) -> tuple[Cache, float, float]:
        """The sealed cache of ``ids`` for a cell, its prefill seconds and its compression seconds (shared path)."""
        start = time.perf_counter()
        if self.shares(cell) and ids == self.head:
            plan = make_plan(**plan_arguments(cell.method, cell.ratio, cell.options))
            shared = self.dense()
            rows = self.reconstruction() if plan.policy.reconstructs() else None
            start = time.perf_counter()
            cache = dense.compress(self.lm.model, shared, plan, rows)
            seconds = time.perf_counter() - start + (self.reconstruction_seconds if rows else 0.0)
            prefill_seconds, compress_seconds = self.dense_seconds + seconds, seconds
        else:
            cache = new_cache(self.lm, cell, len(ids))
            prefill(self.lm.model, torch.tensor([ids]), cache, chunk_size=cell.chunk_size)
            prefill_seconds, compress_seconds = time.perf_counter() - start, 0.0
        cache.seal()
        return cache, prefill_seconds, compress_seconds


def answer_row(sample: Sample, got: Answer, prompt_tokens: int, fidelity: tuple[float, float], nll_full: float) -> dict:
    return {
        "id": sample.id, "context_id": sample.context_id, "depth": sample.depth, "needle_depth": sample.needle_depth,
        "score": got.score, "output": got.text, "answer_ids": got.tokens, "answers": sample.answers,
        "prompt_tokens": prompt_tokens, "question_seconds": got.question_seconds,
        "decode_tokens_per_second": got.decode_tokens_per_second, "read_fraction": got.read_fraction,
        "nll": fidelity[0], "top1": fidelity[1], "nll_full": nll_full,
    }


def run_part(ctx: Context, cell: Cell, references: dict[str, Reference]) -> dict:
    """Answer every question of ``ctx`` under ``cell``; return the part's record (without provenance).

    For the full cell, ``references`` is filled with its answers; other cells need them there.
    """
    started = time.perf_counter(), time.process_time()
    rows, built = [], []  # built: (kv bytes, prefill and compression seconds, computed fraction) per cache built
    with PeakRSS() as mem:
        cache = None
        for sample, tail in zip(ctx.questions, ctx.tails, strict=True):
            ids = ctx.head
            if cell.protocol == "aware":  # one cache per question: all of its prompt but the last token
                ids, tail, cache = ctx.head + tail[:-1], tail[-1:], None
            if cache is None:
                cache, prefill_seconds, compress_seconds = ctx.compressed(cell, ids)
                per_head = cache.computed_fractions() if isinstance(cache, HeadwiseCache) else []  # a peer's: dense
                built.append((cache_bytes(cache), prefill_seconds, compress_seconds,
                              cache.computed_fraction() if isinstance(cache, HeadwiseCache) else 1.0))
            got = answer(ctx.lm, cache, tail, sample)
            reference = got.tokens if cell.is_reference else references[sample.id].tokens
            fidelity = follow(ctx.lm, cache, tail, reference)
            if cell.is_reference:
                references[sample.id] = Reference(got.tokens, fidelity[0])
            rows.append(answer_row(sample, got, len(ids) + len(tail), fidelity, references[sample.id].nll))
            if isinstance(cache, HeadwiseCache) and cache.plan.policy.compresses:
                needle = needle_positions(ctx.lm, sample)
                if needle:  # where the needle went: the share of its tokens each KV head holds
                    rows[-1]["needle_kept"] = needle_kept(cache.held_positions(), needle)
    record = part_record(ctx, cell, rows, built, mem, started)
    return {**record, **({"computed_fractions": per_head} if "sparse" in cell.options else {})}


def part_record(ctx: Context, cell: Cell, rows: list[dict], built: Sequence[tuple[float, float, float, float]],
                mem: PeakRSS, started: tuple[float, float]) -> dict:
    """A part's record (without provenance) from its answers' ``rows`` and, per cache built, its (kv bytes,
    prefill seconds, compression seconds, computed fraction), averaged; ``mem`` watched the part and ``started``
    holds the wall and CPU clocks at its start. A peer that answers without a transformers cache (OpenVINO's)
    builds its records with it too."""
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    kv, prefills, compressions, computed = (sum(column) / len(built) for column in zip(*built, strict=True))
    return {
        "key": cell.part_key(ctx.id, ctx.digest), "cell": cell.key(), **asdict(cell), "context_id": ctx.id,
        "score": sum(r["score"] for r in rows) / len(rows), "kv_bytes": kv, "prefill_seconds": prefills,
        "compress_seconds": compressions, "computed_fraction": computed,
        "shared_prefill": ctx.shares(cell), "peak_rss": mem.peak, "peak_rss_delta": mem.delta,
        "wall_seconds": wall, "cpu_seconds": cpu, "samples": rows,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------- the sweep


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
    """Versions, fingerprint, git commit and machine facts carried by every record."""
    return {
        "library": LIBRARY, "versions": versions(), "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }


def check_versions(records: Iterable[dict], library: str, current: str, *, allow_mixed: bool) -> None:
    """Refuse to add ``library`` records of fingerprint ``current`` to a store holding another one of it."""
    other = sorted({r.get("fingerprint") or "none" for r in records if r.get("library") == library} - {current})
    if other and not allow_mixed:
        raise HeadwiseError(
            f"the results store holds {library} results of other code or versions (fingerprint {', '.join(other)}; "
            f"now {current}): use a new --out folder, or pass --allow-mixed-versions to add to it anyway"
        )


@dataclass(frozen=True)
class Peer:
    """What a peer runner changes in :func:`sweep`: its library name, fingerprint and provenance, how it builds
    a context (a :class:`Context` whose ``compressed`` builds the peer's caches), the fields it adds to a part's
    record and, for a library with no transformers cache, how it runs a part. The order (the full cache first per
    context), the references, the store and its checks are the sweep's; the protocol and the part records are
    :func:`run_part`'s, or for such a library its own loop's, recorded by :func:`part_record`."""

    library: str
    fingerprint: str
    provenance: dict
    context: Callable[[Sequence[Sample]], Context]
    extra: Callable[[Context, Cell, dict], dict]
    #: how a part is run: headwise's protocol on the peer's transformers caches (:func:`run_part`), or the peer's
    #: own loop for a library with no such cache, returning the same record (:func:`part_record`)
    part: Callable[[Context, Cell, dict[str, Reference]], dict] = run_part


def sweep(
    lm: LoadedModel,
    cells: Sequence[Cell],
    samples_for: Callable[[str, int, int], Sequence[Sample]],
    store: Path,
    *,
    progress: bool = True,
    allow_mixed: bool = False,
    share_prefill: bool = True,
    peer: Peer | None = None,
) -> list[dict]:
    """Run the parts of ``cells`` not yet in ``store``, appending each record as soon as it is done.

    ``samples_for(task, length, seed)`` gives the samples (questions, context by context). Interrupt at any
    time: re-running the same sweep runs only what is missing. First a store present only as its committed
    compressed copy is restored (:func:`headwise.bench.store.unpack`: new parts then append to its records, never
    start a store that would replace the copy when packed), its torn lines are moved aside
    (:func:`headwise.bench.store.repair`), its fingerprint is checked, and one cache per method is built, so a
    method that does not fit the model fails before any cell runs. ``share_prefill=False`` builds every cache
    by its own prefill (the direct path: the same results, proven in tests/test_dense.py, at the old cost), to
    measure what the shared prefill saves. A ``peer`` runs its own caches through the same loop.
    """
    from tqdm.auto import tqdm

    library, current = (peer.library, peer.fingerprint) if peer else (LIBRARY, fingerprint())
    unpack(store)
    repair(store)
    stored = {r["key"]: r for r in read_records(store)}
    check_versions(stored.values(), library, current, allow_mixed=allow_mixed)
    groups: dict[tuple[str, int, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.task, c.length, c.seed), []).append(c)
    work = [(g, qs, qs[0].context_id, context_digest(qs)) for g in groups for qs in contexts(samples_for(*g))]
    todo = sum(c.part_key(i, d) not in stored for g, _, i, d in work for c in groups[g])
    if peer is None:
        check_fit(lm, [c for c in cells if any(c.part_key(i, d) not in stored for _, _, i, d in work)])
    meta = peer.provenance if peer else provenance()
    records = []
    bar = tqdm(total=todo, desc=f"bench {library}", unit="part", disable=not progress)
    for g, questions, context_id, digest in work:
        missing = [c for c in groups[g] if c.part_key(context_id, digest) not in stored]
        if not missing:
            continue
        ctx = peer.context(questions) if peer else Context(lm, questions, share_prefill=share_prefill)
        references = stored_references(stored, groups[g], context_id, digest)
        for cell in sorted(missing, key=lambda c: not c.is_reference):
            bar.set_postfix_str(f"{ctx.id} {cell.method} {cell.ratio:g} {cell.protocol}")
            record = (peer.part if peer else run_part)(ctx, cell, references)
            record = {**record, **(peer.extra(ctx, cell, record) if peer else {}), **meta}
            append_record(store, record)
            stored[record["key"]] = record
            records.append(record)
            bar.update(1)
    bar.close()
    return records


def stored_references(stored: dict[str, dict], cells: Sequence[Cell], context_id: str,
                      digest: str) -> dict[str, Reference]:
    """The full cache's answers to a context's questions, from its stored part (empty when not yet run)."""
    full = [c for c in cells if c.is_reference]
    part = stored.get(full[0].part_key(context_id, digest)) if full else None
    if part is None:
        return {}
    return {row["id"]: Reference(row["answer_ids"], row["nll"]) for row in part["samples"]}
