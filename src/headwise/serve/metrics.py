"""The server's counters, written in the Prometheus text exposition format (version 0.0.4) for ``/metrics``."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

PREFIX = "headwise"


@dataclass
class Metrics:
    """Counters updated by the server's threads (under one lock) and gauges read when scraped."""

    requests: Counter = field(default_factory=Counter)  # by endpoint
    errors: Counter = field(default_factory=Counter)  # by HTTP status
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    context_hits: int = 0
    context_misses: int = 0
    cancelled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, **changes: float) -> None:
        """Add to scalar counters by name, e.g. ``count(context_hits=1)``."""
        with self.lock:
            for name, value in changes.items():
                setattr(self, name, getattr(self, name) + value)

    def request(self, endpoint: str) -> None:
        with self.lock:
            self.requests[endpoint] += 1

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[str(status)] += 1

    def render(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> str:
        """The exposition text: every counter, then ``gauges`` (name -> (help, read function))."""
        with self.lock:
            rate = self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
            families: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = [
                ("requests_total", "counter", "Requests received, by endpoint.",
                 [({"endpoint": k}, v) for k, v in sorted(self.requests.items())]),
                ("errors_total", "counter", "Requests answered with an error, by HTTP status.",
                 [({"status": k}, v) for k, v in sorted(self.errors.items())]),
                ("generated_tokens_total", "counter", "Tokens generated.", [({}, self.generated_tokens)]),
                ("decode_tokens_per_second", "gauge", "Tokens generated per second of decoding, over all requests.",
                 [({}, rate)]),
                ("time_to_first_token_seconds", "summary", "From a request's arrival to its first token.",
                 [({"__suffix": "_sum"}, self.ttft_sum), ({"__suffix": "_count"}, self.ttft_count)]),
                ("context_cache_hits_total", "counter", "Requests whose context was already cached.",
                 [({}, self.context_hits)]),
                ("context_cache_misses_total", "counter", "Requests whose context was prefilled and compressed.",
                 [({}, self.context_misses)]),
                ("cancelled_total", "counter", "Requests stopped because the client went away.",
                 [({}, self.cancelled)]),
            ]
        families += [(name, "gauge", text, [({}, read())]) for name, (text, read) in gauges.items()]
        lines = []
        for name, kind, text, samples in families:
            full = f"{PREFIX}_{name}"
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
            for labels, value in samples:
                suffix = labels.pop("__suffix", "")
                tags = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{full}{suffix}{'{' + tags + '}' if tags else ''} {float(value)!r}")
        return "\n".join(lines) + "\n"
