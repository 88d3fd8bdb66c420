"""Docs stay true to the code: every configuration key is documented."""

from __future__ import annotations

from pathlib import Path

from edged.config import describe

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_config_key_is_in_the_operations_guide() -> None:
    text = (DOCS / "operations.md").read_text()
    missing = [key for key, env, _, _ in describe() if f"`{key}`" not in text or env not in text]
    assert not missing, f"docs/operations.md lacks {missing}"
