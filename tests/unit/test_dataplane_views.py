"""The data plane's views stay in step with what they mirror, and frontends stay thin."""

from __future__ import annotations

import ast
from pathlib import Path

from edged.core.views import BREAKER_STATES
from hal.placement import BreakerState

FRONTENDS = Path(__file__).resolve().parents[2] / "edged" / "frontends"
#: what a frontend may import from serving: the data plane only
ALLOWED_SERVING = {"edged.serving.dataplane"}


def test_breaker_states_match_hal() -> None:
    assert tuple(str(s) for s in BreakerState) == BREAKER_STATES


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_frontend_imports_serving_internals_or_hal() -> None:
    offenders = {}
    for path in sorted(FRONTENDS.glob("*.py")):
        bad = {
            m
            for m in _imports(path)
            if m == "hal"
            or m.startswith("hal.")
            or (m.startswith("edged.serving") and m not in ALLOWED_SERVING)
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}
