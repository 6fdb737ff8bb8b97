"""headwise: profile attention heads, plan per-head KV budgets, apply a compressed cache, prove it."""

__version__ = "0.1.0"
