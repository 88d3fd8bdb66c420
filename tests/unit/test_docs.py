"""Docs stay true to the code: every configuration key is documented, the links and files
they name exist inside the repository, and the OTA walk-through runs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edged.config import describe

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_config_key_is_in_the_operations_guide() -> None:
    text = (DOCS / "operations.md").read_text()
    missing = [key for key, env, _, _ in describe() if f"`{key}`" not in text or env not in text]
    assert not missing, f"docs/operations.md lacks {missing}"


# -- commands, files and links the docs name ------------------------------------------------

ROOT = DOCS.parent
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")
BACKTICKED_PATH = re.compile(r"`(\.\./[^`\s]+)`")
NPY = re.compile(r"[\w./-]*\.npy\b")


def _blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_stay_inside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    bad = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#", "file://")):
            continue
        resolved = (doc.parent / target.split("#")[0]).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            bad.append(target)
    for target in BACKTICKED_PATH.findall(text):
        if not (doc.parent / target).resolve().is_relative_to(ROOT):
            bad.append(target)
    assert not bad, f"{doc.name} names paths outside the repository or missing: {bad}"


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_npy_files_in_commands_exist_or_are_made_first(doc: Path) -> None:
    """A .npy file a command block uses is in the repository, or an earlier line of the same
    block saves it (placeholders such as FILE.npy aside)."""
    missing = []
    for block in _blocks(doc):
        made: set[str] = set()
        for line in block.splitlines():
            for name in NPY.findall(line):
                if re.fullmatch(r"[A-Z_]+\.npy", Path(name).name) or name.startswith("."):
                    continue
                if "save(" in line:
                    made.add(name)
                elif name not in made and not (ROOT / name).exists():
                    missing.append(name)
    assert not missing, f"{doc.name}: commands use {missing}, which nothing makes"


def test_footprint_names_the_number_of_example_models() -> None:
    text = (DOCS / "operations.md").read_text()
    counts = re.findall(r"serving `models/` \((\d+) small models[:)]", text)
    models = [p for p in (ROOT / "models").iterdir() if (p / "model.toml").is_file()]
    assert counts, "operations.md no longer says how many models the footprint served"
    assert {int(c) for c in counts} == {len(models)}


def _fleet_commands() -> list[list[str]]:
    """The "In six commands" block of ota.md, as argument lists (continuations joined)."""
    text = (DOCS / "ota.md").read_text()
    block = text.split("## In six commands", 1)[1]
    block = FENCE.search(block).group(1)  # type: ignore[union-attr]
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        if line.startswith("$ "):
            commands.append(shlex.split(line[2:].split("  #")[0]))
    return commands


def test_the_ota_walkthrough_runs_from_the_repository_root(tmp_path: Path) -> None:
    """Every command of the walk-through but the rollout (which needs devices), run from the
    repository root with the repository folder and bundle moved into a temporary folder."""
    commands = _fleet_commands()
    assert [c[1] for c in commands] == [
        "init", "bundle", "publish", "refresh", "status", "rollout",
    ]  # fmt: skip
    for command in commands[:-1]:
        args = [
            a.replace("/srv/fleet", str(tmp_path / "fleet")).replace(
                "digits-2.tar.gz", str(tmp_path / "digits-2.tar.gz")
            )
            for a in command[1:]
        ]
        done = subprocess.run(
            [sys.executable, "-m", "edged.fleet", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
