"""The results store: one JSON record per finished benchmark cell, appended to a JSONL file.

Safety against interruption: each record is written as one line with a single ``write``, then flushed and
``fsync``-ed before the next cell starts, so a killed sweep loses at most the cell in flight. A crash in
the middle of a write leaves a truncated last line; readers skip such malformed lines with a warning
(they cannot be trusted, and the cell is simply run again), the next append first ends the broken
line so it never corrupts a good record, and the next sweep moves it out of the store into
``<store>.torn`` (:func:`repair`), so it warns once. Lines are split at ``"\n"`` only: a record's text may
hold other line breaks (U+2028, U+0085). A cell is identified by ``key`` (see
:func:`headwise.bench.runner.Cell.key`); a sweep skips cells whose key is already stored, and readers keep
the last record of a key, so re-running never duplicates a cell.

Record fields (one JSON object per line; peer runners such as the kvpress one write the same fields)
--------------------------------------------------------------------------------------------------
identity
    ``key`` (str; optional for peers, derived from the identity fields when absent), ``library``
    (``"headwise"`` or ``"kvpress"``), ``model`` (str), ``method`` (str),
    ``options`` (object), ``ratio`` (float, fraction of the context's KV removed; 0 for the full cache),
    ``task`` (str), ``length`` (int, target tokens), ``protocol`` (``"agnostic"``: context compressed before
    the question is seen, or ``"aware"``: the whole prompt with the question compressed), ``n_samples``
    (int), ``seed`` (int), ``chunk_size`` (int or null, prefill chunk).
metrics (means over the samples)
    ``score`` (float in [0, 1]), ``kv_bytes`` (bytes of keys and values physically held after the
    compressed prefill), ``peak_rss`` (bytes, absolute peak resident memory of the process during a
    sample, max over samples), ``peak_rss_delta`` (bytes above the level at the start of the sample, max
    over samples), ``prefill_seconds`` (compressed part of the prompt), ``question_seconds`` (feeding
    the uncompressed rest; 0 for ``aware``), ``decode_tokens_per_second``, ``token_length`` (mean prompt
    tokens), ``wall_seconds`` and ``cpu_seconds`` (the whole cell: elapsed, and CPU time of all the process's
    threads, which tells a busy machine from a slow method), ``samples`` (list of per-sample objects:
    ``id``, ``depth``, ``needle_depth``, ``score``,
    ``output``, ``answers``, ``prompt_tokens``, ``kv_bytes``, ``prefill_seconds``, ``question_seconds``,
    ``decode_tokens_per_second``, ``peak_rss``, ``peak_rss_delta``).
provenance
    ``versions`` (object: ``headwise``, ``torch``, ``transformers``, or the peer's), ``git_commit`` (str or
    null), ``machine`` (object: ``platform``, ``python``, ``cpu_count``, ``torch_threads``),
    ``timestamp`` (ISO 8601, UTC).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from headwise.report.html import write_atomic

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


def read_lines(path: Path) -> list[str]:
    """The lines of a JSONL file, split at ``"\n"`` only; bytes that are not UTF-8 (a torn line) are replaced."""
    return path.read_bytes().decode("utf-8", errors="replace").split("\n")


def read_records(path: Path) -> list[dict]:
    """All valid records of a results file, the last one per key, in file order; malformed lines warn."""
    if not path.exists():
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
    """Keys of the cells already stored in ``path``."""
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
