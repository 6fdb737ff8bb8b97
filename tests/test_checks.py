"""Output paths and chunk sizes are checked before any work (headwise.checks), in every command that writes."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from headwise.checks import check_chunk_size, check_output_dir, check_output_file
from headwise.cli import main
from headwise.errors import HeadwiseError

ROOT = Path(__file__).resolve().parents[1]
UNWRITABLE = Path("/proc/headwise-test/out")  # nothing can be created under /proc, not even by root


def bad_outputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Output folders that must be refused, and what the message says."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {"a file": (a_file, "is an existing file"), "under a file": (a_file / "sub", "is a file, not a folder")}
    if UNWRITABLE.parent.parent.is_dir():
        cases["unwritable"] = (UNWRITABLE, "not writable")
    return cases


def test_output_folder_checks(tmp_path):
    for path, message in bad_outputs(tmp_path).values():
        with pytest.raises(HeadwiseError, match=message):
            check_output_dir(path)
    fresh = tmp_path / "new" / "deeper"
    assert check_output_dir(fresh) == fresh and not (tmp_path / "new").exists()  # nothing is created
    assert check_output_dir(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]  # the write probe leaves nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_read_only_folder_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(HeadwiseError, match="not writable"):
            check_output_dir(tmp_path / "out")
        with pytest.raises(HeadwiseError, match="not writable"):
            check_output_file(tmp_path / "out.jsonl")
    finally:
        tmp_path.chmod(0o755)


def test_output_file_checks(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    with pytest.raises(HeadwiseError, match="is an existing folder"):
        check_output_file(tmp_path)
    with pytest.raises(HeadwiseError, match="is a file, not a folder"):
        check_output_file(a_file / "out.json")
    if UNWRITABLE.parent.parent.is_dir():
        with pytest.raises(HeadwiseError, match="not writable"):
            check_output_file(UNWRITABLE)
    assert check_output_file(a_file) == a_file and a_file.read_text() == "keep"
    assert check_output_file(tmp_path / "new" / "out.json") == tmp_path / "new" / "out.json"
    assert not (tmp_path / "new").exists()


def test_chunk_size_check():
    assert check_chunk_size(None) is None and check_chunk_size(1) == 1
    for bad in (0, -5):
        with pytest.raises(HeadwiseError, match="at least 1 token"):
            check_chunk_size(bad)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model: the checks must come first."""
    import headwise.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(headwise.models, "load_model", refuse)


@pytest.mark.parametrize("command", ["profile", "bench"])
def test_commands_refuse_bad_output_folders_before_loading(command, tmp_path, capsys, no_model_load):
    for path, message in bad_outputs(tmp_path).values():
        assert main([command, "--out", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("headwise: error: ") and message in err and err.count("\n") == 1


def test_bench_checks_the_paths_it_writes_inside_its_folder(tmp_path, capsys, no_model_load):
    (tmp_path / "results.jsonl").mkdir()
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert "output file '" in capsys.readouterr().err
    (tmp_path / "results.jsonl").rmdir()
    (tmp_path / "tasks").write_text("x")
    assert main(["bench", "--out", str(tmp_path)]) == 2
    assert "is an existing file" in capsys.readouterr().err


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("script", "args"), [
    ("measure_cache.py", []),
    ("shared_prefill_cost.py", []),
])
def test_scripts_refuse_bad_output_files_before_loading(script, args, tmp_path, monkeypatch, no_model_load):
    module = load_script(script)
    monkeypatch.setattr(module, "load_model", sys.modules["headwise.models"].load_model)
    monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(tmp_path)])
    with pytest.raises(HeadwiseError, match="is an existing folder"):
        module.main()


def test_dtype_option_and_its_resolution() -> None:
    from headwise.checks import DTYPES, add_dtype_option
    from headwise.models import native_bfloat16, resolve_dtype

    parser = argparse.ArgumentParser()
    add_dtype_option(parser)
    assert parser.parse_args([]).dtype == "auto"
    assert parser.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--dtype", "float16"])
    assert exc.value.code == 2
    assert resolve_dtype("auto") == ("bfloat16" if native_bfloat16() else "float32")
    assert {resolve_dtype(d) for d in DTYPES} <= {"float32", "bfloat16"}
    with pytest.raises(HeadwiseError, match="unknown dtype"):
        resolve_dtype("int8")
