"""The import layers, read from the source with ``ast`` (nothing is imported): which package
may import which (ALLOWED), that the packages form no circle, that the hal modules form none,
and that the device-side OTA package needs no HAL.

A package is ``hal``, ``edged`` (the root module: ``__version__``), or ``edged.<name>`` (a
subpackage, or a top-level module such as ``edged.config``). Generated stubs
(``edged._proto``) are not checked; importing them is a permission like any other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (a deferred import inside a function
    counts): ``from a.b import c`` is ``a.b.c`` where that is a module, else ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the tree imports absolutely)"
            assert node.module is not None
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def source_files(package: str) -> list[Path]:
    return sorted(ROOT.joinpath(*package.split(".")).rglob("*.py"))


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (a path that comes back to its start), or [] when it has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return []

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return []


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


# Who may import whom, bottom up; a package not listed imports nothing of edged or hal.
_BASE = {"edged", "edged.core"}  # the version and the shared vocabulary: everyone's
ALLOWED: dict[str, set[str]] = {
    # hal/remote.py speaks KServe v2 through the generated stubs: a leaf of generated code
    # (it imports only its own descriptor pool), the wire's vocabulary as core is the domain's
    "hal": {"edged.core", "edged._proto"},
    "edged.security": _BASE | {"edged.storage"},
    "edged.config": _BASE | {"edged.security"},
    # serving -> partition: re-planning a split model runs the pure planner on the cost table
    # of [partition]'s profiles (edged.partition.planner, .profile; never onnx, .graph's cuts)
    "edged.serving": _BASE | {"edged.config", "edged.partition", "edged.storage", "hal"},
    "edged.ota": _BASE | {"edged.config", "edged.serving", "edged.storage"},
    # learn -> hal: a trainable model's backbone loads through the executor registry
    # (edged/learn/features.py), never in a runtime session of its own
    "edged.learn": _BASE | {"edged.config", "edged.ota", "edged.serving", "edged.storage", "hal"},
    # updates and learning as the frontends see them (edged/controlplane.py)
    "edged.controlplane": _BASE | {"edged.learn", "edged.ota"},
    # federated learning: device side over learn, fleet side under edged.fleet (issue #17)
    "edged.federated": _BASE | {"edged.config", "edged.learn", "edged.ota"},
    # frontends -> serving: only edged.serving.dataplane (tests/unit/test_dataplane_views.py);
    # OTA and learning only through the control plane, edged.controlplane
    "edged.frontends": _BASE
    | {"edged._proto", "edged.config", "edged.controlplane", "edged.security", "edged.serving"},
    "edged.client": _BASE | {"edged._proto", "edged.frontends", "edged.security"},
    "edged.daemon": _BASE
    | {"edged.config", "edged.controlplane", "edged.frontends", "edged.learn"}
    | {"edged.lifecycle", "edged.logs"}
    | {"edged.ota", "edged.security", "edged.serving", "edged.storage", "hal"}
    | {"edged.federated"},
    # split execution: cuts, profiles and plans; run by `edged partition`, not by the daemon
    "edged.partition": _BASE | {"edged._proto", "edged.security", "edged.storage", "hal"},
    "edged.cli": _BASE
    | {"edged._proto", "edged.config", "edged.daemon", "edged.frontends", "edged.logs"}
    | {"edged.optimize", "edged.partition", "edged.security", "hal"},
    # edged optimize: fleet-side tooling (also usable on a device); reads bundles with the OTA
    # archive rules, trains heads with edged.learn, measures through the HAL
    "edged.optimize": _BASE | {"edged.learn", "edged.ota", "edged.serving", "edged.storage", "hal"},
    "edged.fleet": _BASE
    | {"edged._proto", "edged.cli", "edged.ota", "edged.security", "edged.serving"}
    | {"edged.storage", "hal"}
    | {"edged.federated", "edged.learn", "edged.optimize"},
}


def package_of(module: str) -> str | None:
    """The package ``module`` belongs to (see the module docstring); None outside the tree."""
    parts = module.split(".")
    if parts[0] == "hal":
        return "hal"
    if parts[0] != "edged":
        return None
    return "edged" if len(parts) == 1 else f"edged.{parts[1]}"


def package_graph() -> dict[str, dict[str, set[str]]]:
    """{package: {imported package: the files that import it}}, without generated stubs."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in source_files("edged") + source_files("hal"):
        if "_proto" in path.parts:
            continue
        source = package_of(_module_name(path))
        assert source is not None
        edges = graph.setdefault(source, {})
        for name in imported_modules(path):
            target = package_of(name)
            if target is not None and target != source:
                edges.setdefault(target, set()).add(str(path.relative_to(ROOT)))
    return graph


def test_packages_import_only_what_the_table_allows() -> None:
    offenders = [
        f"{source} -> {target} ({', '.join(sorted(files))})"
        for source, edges in sorted(package_graph().items())
        for target, files in sorted(edges.items())
        if target not in ALLOWED.get(source, set())
    ]
    assert not offenders, offenders


def test_the_packages_form_no_circle() -> None:
    assert find_cycle(ALLOWED) == []  # the table is layered ...
    actual = {source: set(edges) for source, edges in package_graph().items()}
    assert find_cycle(actual) == []  # ... and so is the code, whatever the table says


def test_the_base_imports_nothing_above_it() -> None:
    graph = package_graph()
    for base in ("edged", "edged.core", "edged.storage", "edged.logs", "edged.lifecycle"):
        assert not graph.get(base), f"{base} imports {sorted(graph.get(base, {}))}"
    # hal imports no serving, ota, frontends ... (the stubs: the remote executor's wire)
    assert set(graph["hal"]) <= {"edged.core", "edged._proto"}


def test_device_side_ota_imports_no_hal() -> None:
    # bundle building (which runs a model through the HAL) is the fleet's: edged.fleet.build
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in source_files("edged.ota")
        for name in imported_modules(path)
        if name == "hal" or name.startswith("hal.")
    }
    assert not offenders, sorted(offenders)


def test_the_device_side_never_imports_the_fleet_side() -> None:
    device = [p for p in source_files("edged") if "fleet" not in p.relative_to(ROOT).parts]
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in device
        for name in imported_modules(path)
        if name == "edged.fleet" or name.startswith("edged.fleet.")
    }
    assert not offenders, sorted(offenders)


def test_the_hal_modules_import_one_another_without_a_circle() -> None:
    # DeviceReport lives in hal/report.py so that the contract (executor.py) and placement need
    # not import hal/probe.py, which imports the executors' modules to run their checks
    graph = {
        _module_name(path): {
            name for name in imported_modules(path) if name.startswith("hal.") or name == "hal"
        }
        for path in source_files("hal")
        if path.name not in {"__init__.py", "__main__.py"}  # the package's face, not a layer
    }
    for imports in graph.values():
        imports.discard("hal")  # hal/__init__.py only re-exports
    assert find_cycle(graph) == []
