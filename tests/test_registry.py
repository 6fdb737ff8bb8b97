"""The registry answers without torch, and keeps a model's architecture facts once they were read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import transformers
from transformers import LlamaConfig

from headwise import registry


def test_the_command_line_imports_neither_torch_nor_transformers():
    code = "import sys, headwise.cli; sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) or 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def cached_config(tmp_path, monkeypatch):
    """A dequantized-folder config.json for smollm2-135m in an empty headwise cache."""
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path))
    folder = registry.cached_folder("smollm2-135m")
    LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                max_position_embeddings=512).save_pretrained(folder)
    return folder / "config.json"


def test_facts_are_read_once_then_remembered_until_the_source_changes(cached_config, monkeypatch):
    _, _, info = registry.describe("smollm2-135m")
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (3, 4, 2, 16)

    def refuse(*args, **kwargs):
        raise AssertionError("read the config again")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    assert registry.describe("smollm2-135m")[2] == info
    stat = cached_config.stat()
    os.utime(cached_config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="read the config again"):
        registry.describe("smollm2-135m")


def test_a_damaged_facts_file_is_read_again(cached_config):
    info = registry.describe("smollm2-135m")[2]
    facts = registry.cache_root() / "info" / "smollm2-135m.json"
    facts.write_text("{not json", encoding="utf-8")
    assert registry.describe("smollm2-135m")[2] == info
    assert json.loads(facts.read_text(encoding="utf-8"))["info"]["num_layers"] == 3
