"""The cache reaches the model under the name the installed transformers takes, or headwise says so loudly."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from headwise import compat
from headwise.api import make_cache
from headwise.errors import HeadwiseError
from headwise.generation import prefill


def test_the_argument_name_is_read_from_the_forward_signature():
    model = tiny_model("llama")
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert compat.cache_argument(model) == expected

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    class NoCache(torch.nn.Module):
        def forward(self, input_ids): ...

    assert compat.cache_argument(OldStyle()) == "past_key_values"
    with pytest.raises(HeadwiseError, match="takes none of the cache arguments"):
        compat.cache_argument(NoCache())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_cache_the_model_never_filled_is_an_error_naming_the_transformers_version(arch, monkeypatch):
    model = tiny_model(arch)
    cache = make_cache(model, "knorm", ratio=0.5)
    # What a renamed argument does: the model takes the cache as an unknown keyword, builds its own and leaves
    # this one empty, with no error of its own.
    monkeypatch.setattr(compat, "cache_argument", lambda model: "kv_cache")
    message = rf"did not store the 20 new tokens.*transformers {compat.transformers_version()}"
    with pytest.raises(HeadwiseError, match=message):
        prefill(model, torch.arange(20)[None], cache)
    assert cache.get_seq_length() == 0


def test_the_check_passes_when_the_cache_took_the_tokens_and_allows_caches_that_evict():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        compat.forward(model, cache, torch.arange(12)[None])
    assert cache.get_seq_length() == 12
    compat.check_filled(model, cache, before=4, new_tokens=10, evicts=True)  # 8 held of 10 new: a press evicted
    with pytest.raises(HeadwiseError):
        compat.check_filled(model, cache, before=4, new_tokens=10)
    with pytest.raises(HeadwiseError):
        compat.check_filled(model, cache, before=12, new_tokens=10, evicts=True)  # nothing stored at all


def test_headwise_calls_raise_no_future_warning():
    model = tiny_model("llama")
    cache = make_cache(model, "snapkv", ratio=0.5, options={"window": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prefill(model, torch.arange(30)[None], cache)
        fresh = make_cache(model, "snapkv", ratio=0.5, options={"window": 4})
        model.generate(torch.arange(30)[None], **compat.cache_kwargs(model, fresh), max_new_tokens=3,
                       do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == 30 and fresh.get_seq_length() == 32
