"""The edged command's own manners: plain --help, a closed pipe, input files that are not
.npy files. None of these reaches a daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.cli import main
from tests.daemon_process import REPO_ROOT, run_cli


@pytest.mark.parametrize("command", [[], ["serve"], ["devices"], ["infer"], ["learn", "start"]])
def test_help_has_no_markup(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "`" not in result.stdout


@pytest.mark.parametrize("tool", ["edged", "edged-fleet"])
def test_closed_pipe_ends_quietly(tool: str, tmp_path: Path) -> None:
    """`edged devices --json | head -1`: the reader is gone before the output is written."""
    if tool == "edged":
        command = ["edged.cli", "devices", "--json"]
    else:
        assert run_cli_module("edged.fleet", "init", str(tmp_path / "fleet")).returncode == 0
        command = ["edged.fleet", "status", str(tmp_path / "fleet"), "--json"]
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        result = subprocess.run(
            [sys.executable, "-m", *command],
            stdout=write_fd,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_fd)
    assert result.stderr == ""  # no BrokenPipeError traceback
    assert result.returncode == 141  # as a tool killed by SIGPIPE


def run_cli_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        pytest.param(b"1,2,3\n", "not a .npy file", id="text"),
        pytest.param(b"PK\x03\x04rest", "a .npz archive", id="npz"),
    ],
)
def test_input_that_is_not_npy_names_flag_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, says: str
) -> None:
    path = tmp_path / "input.csv"
    path.write_bytes(content)
    assert main(["infer", "digits", "--input", f"input={path}", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert f"--input {path}: {says}" in err
    assert "numpy.save" in err
    assert "pickled" not in err


def test_pickled_npy_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["infer", "digits", "--input", f"input={path}"]) == 2
    err = capsys.readouterr().err
    assert f"--input {path}: a .npy file that holds Python objects" in err


def test_labels_that_are_not_npy_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("0 1 2\n")
    code = main(
        [
            "learn",
            "add",
            "digits_learn",
            "--input",
            f"input={REPO_ROOT / 'models/digits/sample.npy'}",
            "--labels",
            str(labels),
        ]
    )
    assert code == 2
    assert f"--labels {labels}: not a .npy file" in capsys.readouterr().err
