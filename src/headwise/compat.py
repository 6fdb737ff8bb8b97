"""The one place where headwise hands a cache to a model, and the check that the cache got the tokens.

transformers 5.24 renamed the ``forward``/``generate`` argument ``past_key_values`` to ``cache``; the old name
warns until it is removed in 5.40. A model given a name it does not know takes it as one more keyword, builds
a cache of its own and leaves the caller's empty, with no error. So headwise

* reads the name from the model's ``forward`` signature (:func:`cache_argument`), never from a version
  string;
* runs every forward that takes a cache through :func:`forward`, which checks afterwards that the cache
  holds the new tokens and raises a :class:`~headwise.errors.HeadwiseError` naming the transformers version
  when it does not;
* gives ``model.generate`` the same name through :func:`cache_kwargs`.

Standard library only (the model and cache are duck-typed), so the peer runners, which live in their own
virtual environments with other transformers versions, use this very module.
"""

from __future__ import annotations

import functools
import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from headwise.errors import HeadwiseError

NAMES = ("cache", "past_key_values")  # newest first


def transformers_version() -> str:
    """The installed transformers version, for messages ("unknown" when it cannot be read)."""
    try:
        return version("transformers")
    except PackageNotFoundError:
        return "unknown"


def cache_argument(model: Any) -> str:
    """The name under which ``model.forward`` takes a cache: ``"cache"`` (5.24 on) or ``"past_key_values"``."""
    return _argument_of(type(model))


@functools.cache
def _argument_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    for name in NAMES:
        if name in parameters:
            return name
    raise HeadwiseError(
        f"{model_class.__name__}.forward takes none of the cache arguments {', '.join(NAMES)} "
        f"(transformers {transformers_version()}): headwise cannot hand it a cache"
    )


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the name ``model`` takes, for ``model(**...)`` and ``model.generate(**...)``."""
    return {cache_argument(model): cache}


def check_filled(model: Any, cache: Any, before: int, new_tokens: int, *, evicts: bool = False) -> None:
    """Raise unless ``cache`` grew from ``before`` tokens by ``new_tokens`` (by at least one when it ``evicts``).

    ``evicts`` is for caches that physically drop tokens inside the forward and count only what they hold
    (kvpress's presses on a ``DynamicCache``); headwise's caches count every token seen.
    """
    after = cache.get_seq_length()
    grown = after - before
    if grown == new_tokens or (evicts and 0 < grown <= new_tokens):
        return
    raise HeadwiseError(
        f"{type(model).__name__} did not store the {new_tokens} new tokens in the cache it was given "
        f"(its length went from {before} to {after}); transformers {transformers_version()} may expect the cache "
        f"under another name than '{cache_argument(model)}'"
    )


def forward(model: Any, cache: Any, input_ids: Any, *, evicts: bool = False, **kwargs: Any) -> Any:
    """``model(input_ids, <cache argument>=cache, use_cache=True, **kwargs)``, checked by :func:`check_filled`."""
    before = cache.get_seq_length()
    out = model(input_ids=input_ids, use_cache=True, **cache_kwargs(model, cache), **kwargs)
    check_filled(model, cache, before, input_ids.shape[1], evicts=evicts)
    return out
