"""The results store: one JSON record per finished *part* (one benchmark cell on one context), appended to a
JSONL file.

Safety against interruption: each record is written as one line with a single ``write``, then flushed and
``fsync``-ed before the next part starts, so a killed sweep loses at most the part in flight. A crash in
the middle of a write leaves a truncated last line; readers skip such malformed lines with a warning
(they cannot be trusted, and the part is simply run again), the next append first ends the broken
line so it never corrupts a good record, and the next sweep moves it out of the store into
``<store>.torn`` (:func:`repair`), so it warns once. Lines are split at ``"\n"`` only: a record's text may
hold other line breaks (U+2028, U+0085). A part is identified by ``key`` (see
:func:`headwise.bench.runner.Cell.part_key`); a sweep skips parts whose key is already stored, and readers keep
the last record of a key, so re-running never duplicates a part.

Committed stores are gzip-compressed copies, ``<store>.gz`` (:func:`pack`, written after every sweep):
:func:`read_records` reads the copy when the store itself is absent (a clean clone), and :func:`unpack`
restores the store from it before a sweep resumes.

Record fields (one JSON object per line; peer runners such as the kvpress one write the same fields)
--------------------------------------------------------------------------------------------------
identity
    ``key`` (str, the part's key; optional for peers, derived from the identity fields when absent), ``cell``
    (str, the cell's key: every part of a cell shares it), ``library`` (``"headwise"`` or a peer's name),
    ``model`` (str), ``method`` (str), ``options`` (object, as given), ``resolved`` (object, every option with
    its default; the cell key hashes these), ``ratio`` (float, fraction of the context's KV removed; 0 for the
    full cache), ``task`` (str), ``length`` (int, target tokens), ``protocol`` (``"agnostic"``: context
    compressed before the question is seen, or ``"aware"``: the prompt with the question compressed),
    ``n_samples`` (int, contexts in the cell), ``seed`` (int), ``chunk_size`` (int or null, prefill chunk),
    ``calibration`` (bool: the full cache on the calibration seed, see :mod:`headwise.bench.calibration`),
    ``fingerprint`` (str, the code and versions that computed it), ``context_id`` (str).
metrics of the part
    ``score`` (mean over its answers), ``kv_bytes`` (bytes of keys and values physically held after the
    compressed prefill; the mean over the caches built: one per question for ``aware``), ``prefill_seconds``
    (the compressed part of the prompt; with ``shared_prefill`` the shared dense forward plus this cell's
    compression), ``compress_seconds`` (the compression alone on the shared path, else 0), ``shared_prefill``
    (bool), ``peak_rss`` (bytes, absolute peak resident memory of the process during the part),
    ``peak_rss_delta`` (bytes above the level at its start), ``wall_seconds`` and ``cpu_seconds`` (the whole
    part: elapsed, and CPU time of all the process's threads, which tells a busy machine from a slow method).
``samples``: one object per answer
    ``id`` (the question's id: the pairing key across methods and libraries), ``context_id``, ``depth``,
    ``needle_depth``, ``score``, ``output``, ``answer_ids`` (the greedy answer's token ids), ``answers``,
    ``prompt_tokens``, ``question_seconds`` (feeding the question), ``decode_tokens_per_second``, ``nll`` (mean
    NLL per token of the full cache's answer teacher-forced in this cache), ``top1`` (fraction of those tokens
    still ranked first), ``nll_full`` (the full cache's own NLL of its answer; these three are null for a peer that
    cannot teacher-force an answer through its cache, OpenVINO's); for a compressed headwise cache,
    ``needle_kept`` (per compressed layer index and KV head, the share of the needle's tokens the head holds:
    :mod:`headwise.explain.needles`; absent in stores written before it).
provenance
    ``versions`` (object: ``headwise``, ``torch``, ``transformers``, or the peer's), ``git_commit`` (str or
    null), ``machine`` (object: ``platform``, ``python``, ``cpu_count``, ``torch_threads``),
    ``timestamp`` (ISO 8601, UTC).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
from pathlib import Path

from headwise.report.html import write_atomic

GZIP_MAGIC = b"\x1f\x8b"
REQUIRED = ("library", "model", "method", "ratio", "task", "length", "protocol", "score")
IDENTITY = ("library", "model", "method", "options", "ratio", "task", "length", "protocol", "n_samples", "seed")


def append_record(path: Path, record: dict) -> None:
    """Append one record as a JSON line and make it durable (flush + fsync) before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
    with open(path, "a+b") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def identity_key(record: dict) -> str:
    """A key for a record that carries none (a peer's): hash of its identity fields."""
    blob = json.dumps({name: record.get(name) for name in IDENTITY}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def parse_line(line: str) -> dict | None:
    """A record from one line, or None if the line is not a JSON object with the required fields.

    A record without ``key`` (peer runners may omit it) gets :func:`identity_key`.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or any(name not in record for name in REQUIRED):
        return None
    return record if "key" in record else {**record, "key": identity_key(record)}


def packed(path: Path) -> Path:
    """The gzip-compressed copy of a store: ``<store>.gz``."""
    return path.with_name(path.name + ".gz")


def pack(path: Path) -> None:
    """Write the store's compressed copy atomically (reproducible bytes: no name or time in the gzip header)."""
    if path.exists():
        write_atomic(packed(path), gzip.compress(path.read_bytes(), mtime=0))


def unpack(path: Path) -> None:
    """Restore an absent store from its compressed copy, so a sweep resumes from a clean clone."""
    if not path.exists() and packed(path).exists():
        write_atomic(path, gzip.decompress(packed(path).read_bytes()))


def read_lines(path: Path) -> list[str]:
    """The lines of a JSONL file, gzip-compressed or not (or of its compressed copy when the file is absent),
    split at ``"\n"`` only; bytes that are not UTF-8 (a torn line) are replaced."""
    data = path.read_bytes() if path.exists() else packed(path).read_bytes()
    if data[:2] == GZIP_MAGIC:  # a compressed copy, named directly or found beside the absent store
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace").split("\n")


def read_records(path: Path) -> list[dict]:
    """All valid records of a results file (or of its compressed copy), the last one per key, in file order;
    malformed lines warn."""
    if not path.exists() and not packed(path).exists():
        return []
    by_key: dict[str, dict] = {}
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        record = parse_line(line)
        if record is None:
            warnings.warn(f"{path}:{number}: skipping a malformed results line", stacklevel=2)
            continue
        by_key.pop(record["key"], None)
        by_key[record["key"]] = record
    return list(by_key.values())


def completed_keys(path: Path) -> set[str]:
    """Keys of the parts already stored in ``path``."""
    return {r["key"] for r in read_records(path)}


def _is_record(line: bytes) -> bool:
    try:
        return parse_line(line.decode("utf-8")) is not None
    except UnicodeDecodeError:
        return False


def repair(path: Path) -> int:
    """Move the malformed lines of a results store (torn by a crash mid-write) to ``<path>.torn``; return how many.

    The torn lines are appended to the side file and made durable first, then the store is replaced atomically
    by its good lines, in order, so a crash at any point loses no good record (at worst a torn line is in both
    files). Warns once, saying what was moved. The store's only writer is the sweep that calls this, so no
    other process appends to it meanwhile.
    """
    if not path.exists():
        return 0
    good: list[bytes] = []
    torn: list[bytes] = []
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            (good if _is_record(line) else torn).append(line)
    if not torn:
        return 0
    side = path.with_name(path.name + ".torn")
    with open(side, "ab") as fh:
        fh.write(b"".join(line + b"\n" for line in torn))
        fh.flush()
        os.fsync(fh.fileno())
    write_atomic(path, b"".join(line + b"\n" for line in good))
    warnings.warn(f"{path}: moved {len(torn)} malformed line(s), left by an interrupted write, to {side}",
                  stacklevel=2)
    return len(torn)


def complete_tasks(records: list[dict]) -> tuple[list[dict], list[str]]:
    """The records of the tasks a sweep has finished, and a line for each task left out.

    A task (library, model, length, task) is finished when every cell of it (method, options, ratio, protocol,
    calibration) holds all its ``n_samples`` contexts and it has every (method, ratio) the store has for any
    task, so a snapshot for a published table leaves out a task whose sweep is still under way.
    """
    def task_of(r: dict) -> tuple:
        return (r["library"], r["model"], r["length"], r["task"])

    def cell_of(r: dict) -> tuple:
        return (r["method"], json.dumps(r.get("options") or {}, sort_keys=True), r["ratio"], r["protocol"],
                bool(r.get("calibration")))

    contexts: dict[tuple, dict[tuple, set[str]]] = {}
    wanted: dict[tuple, int] = {}
    for r in records:
        contexts.setdefault(task_of(r), {}).setdefault(cell_of(r), set()).add(r.get("context_id", r["key"]))
        wanted[task_of(r) + cell_of(r)] = int(r.get("n_samples", 1))
    settings = {(cell[0], cell[1], cell[2], cell[3]) for cells in contexts.values() for cell in cells
                if not cell[4]}
    done, notes = set(), []
    for task, cells in contexts.items():
        short = [cell for cell, ids in cells.items() if len(ids) < wanted[task + cell]]
        missing = settings - {cell[:4] for cell in cells if not cell[4]}
        if short or missing:
            notes.append(f"{'/'.join(map(str, task))}: {len(short)} cells short of their contexts, "
                         f"{len(missing)} settings not started")
        else:
            done.add(task)
    return [r for r in records if task_of(r) in done], notes
