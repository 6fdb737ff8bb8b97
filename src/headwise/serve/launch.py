"""Start ``headwise serve`` in a child process and read it from outside: for tests and measurement scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from headwise.errors import HeadwiseError


def free_port(host: str = "127.0.0.1") -> int:
    """A port the system has free now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus exposition text -> ``{"name{labels}": value}`` (labels as written), comments skipped."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def headwise_serve(port: int, threads: int, args: list[str]) -> list[str]:
    """The command line of ``headwise serve ARGS`` on ``port`` with ``threads`` torch threads."""
    return [sys.executable, "-m", "headwise.cli", "serve", "--port", str(port), "--threads", str(threads), *args]


class ServerProcess:
    """A server on loopback, started and waited for on construction: ``headwise serve ARGS``, or the command
    ``program(port)`` returns (another OpenAI-compatible server), ready once ``ready`` answers HTTP 200.

    Use as a context manager, or call :meth:`close`. ``url`` is the server's root (``.../v1`` is the API).
    """

    def __init__(self, args: list[str], *, timeout: float = 600, threads: int = 1,
                 program: Callable[[int], list[str]] | None = None, ready: str = "/health") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = program(self.port) if program else headwise_serve(self.port, threads, args)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close); not a pipe: a full one blocks the server
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                output = self.log.read().decode(errors="replace").strip()
                self.log.close()
                raise HeadwiseError(f"{command[0]} exited with {self.process.returncode}: {output[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}{ready}", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise HeadwiseError(f"the server did not answer {ready} within {timeout:.0f} s")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics") as r:
            return parse_metrics(r.read().decode())

    def metric(self, name: str) -> float:
        """The value of one unlabelled metric, or the sum over the labels of a labelled one (0 when absent)."""
        prefix = f"headwise_{name}"
        return sum(v for k, v in self.metrics().items() if k == prefix or k.startswith(prefix + "{"))

    def memory(self) -> dict[str, int]:
        """The process's resident set now and at its peak, in bytes (``VmRSS`` and ``VmHWM`` of /proc, Linux)."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return {"rss": fields["VmRSS"], "peak_rss": fields["VmHWM"]}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
