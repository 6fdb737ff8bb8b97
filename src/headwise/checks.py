"""Checks of command-line input that must pass before any long work starts (standard library only).

* :func:`check_output_dir` / :func:`check_output_file`: an output path that is the wrong kind of thing, or
  that cannot be created or written, is refused up front, not after minutes of work;
* :func:`check_chunk_size`: a prefill chunk is a positive number of tokens;
* :func:`add_threads_option` and :func:`set_threads`: ``--threads``, torch's CPU threads, for every command
  that runs a model;
* :func:`add_dtype_option`: ``--dtype``, the precision the model runs in (:func:`headwise.models.load_model`).

Only the standard library is imported, so the scripts and the peer runners can use them too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from headwise.errors import HeadwiseError


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, target: Path) -> None:
    """Refuse ``target`` unless ``folder`` (it, or the ancestor it would be created under) takes new files."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise HeadwiseError(f"cannot create '{target}': '{base}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise HeadwiseError(f"cannot write '{target}': folder '{base}' is not writable ({exc.strerror})") from exc


def check_output_dir(path: Path) -> Path:
    """Refuse an output folder that is an existing file, or that cannot be created or written; return it.

    Nothing is created: the folder is made when the first output is written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HeadwiseError(f"output folder '{path}' is an existing file")
    _check_writable_folder(path, path)
    return path


def check_output_file(path: Path) -> Path:
    """Refuse an output file that is an existing folder, an existing file that cannot be written, or one that
    cannot be created; return it. Nothing is created or changed."""
    path = Path(path)
    if path.is_dir():
        raise HeadwiseError(f"output file '{path}' is an existing folder")
    _check_writable_folder(path.parent, path)
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise HeadwiseError(f"cannot write '{path}' ({exc.strerror})") from exc
    return path


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Refuse a prefill chunk of fewer than one token (None: no chunks); return it."""
    if chunk_size is not None and chunk_size < 1:
        raise HeadwiseError(f"the chunk size (--chunk-size) must be at least 1 token, got {chunk_size}")
    return chunk_size


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, read by :func:`set_threads`."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is far faster on a machine shared with "
                        "other jobs, where 2-thread decoding stalls on oversubscribed cores")


#: What ``--dtype`` takes: a precision, or ``auto`` for bfloat16 where the CPU computes it natively, else float32.
DTYPES = ("float32", "bfloat16", "auto")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, given to :func:`headwise.models.load_model`."""
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="precision of the weights, activations and KV cache; auto (the default): bfloat16 where "
                        "the CPU has native bfloat16 instructions (avx512_bf16 or AMX), whose answers matched "
                        "float32's on the benchmark's calibrated tasks (BENCHMARKS.md), else float32")


def set_threads(threads: int | None) -> None:
    """Refuse fewer than one thread, then set torch's CPU threads (None: leave torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise HeadwiseError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
