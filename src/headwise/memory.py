"""Process memory measurement: peak resident memory over a block of code.

``ru_maxrss`` only ever grows over a process's life, so it cannot give the peak of one step in a long run.
:class:`PeakRSS` samples the resident set size from ``/proc/self/statm`` in a background thread
(every ``interval`` seconds) and reports the peak above the level at entry. Allocations shorter than the
interval can be missed, so the figure is a lower bound; 2 ms is enough for prefill-sized tensors.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager: ``peak`` is the largest RSS seen inside the block, ``delta`` that minus RSS at entry."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start
