"""``headwise serve``: an OpenAI-compatible server that compresses each long context once and answers many
questions from it.

The loop, one module each:

* :mod:`headwise.serve.prompts` splits a request into its context (a long system or first user message, or a
  completion prompt up to its last blank line) and the rest;
* :mod:`headwise.serve.contexts` keeps compressed contexts by a hash of their tokens and plan, least recently
  used out first within a cap in bytes, and saves them as safetensors;
* :mod:`headwise.serve.engine` serves queued requests in order on one worker thread, each from a deep copy of
  its context's cache;
* :mod:`headwise.serve.app` is the HTTP side (FastAPI): the OpenAI endpoints, ``/health`` and ``/metrics``;
* :mod:`headwise.serve.metrics` writes the counters in the Prometheus text format.

See docs/SERVING.md.
"""
