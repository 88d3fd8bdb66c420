"""``edged-fleet bundle --optimize``: compress a model with ``edged optimize`` and make the
chosen accepted variant the bundle, carrying its evidence (docs/optimize.md, "Into the
pipeline").

The bundle of a variant holds, besides what every bundle holds:

- ``optimize.json`` (an artifact, installed beside the model): the lineage (the parent's
  name and SHA-256, the method, the calibration and held-out sets' SHA-256, the budget),
  the chosen variant's figures, how it was chosen, and every variant's figures (the whole
  report, accepted or not);
- bundle.toml ``[optimize]`` (``edged.ota.bundle.OptimizeEvidence``): method, parent,
  hashes, and the top-1 agreement and output error the variant reached against its parent
  on the check set;
- ``optimize.npz``, the check set: at most ``check_samples`` held-out inputs (never used
  for calibration, at most ``MAX_CHECK_BYTES``) and the parent's outputs to them. The
  device runs the variant on them on its own executor before it takes traffic and refuses
  it when it drifts beyond what was recorded (``edged.ota.bundle.check_optimized``).

The optimiser (onnx, onnxruntime.quantization) is imported only when run.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.fleet.build import build_bundle, selftest_npz
from edged.ota.bundle import OPTIMIZE_FILE, OptimizeEvidence, compare_outputs
from edged.ota.errors import BundleError

PICKS = ("smallest", "fastest", "best-quality")
"""How the bundled variant is chosen among the accepted ones (``--pick``)."""
DEFAULT_CHECK_SAMPLES = 32
"""Held-out rows the bundle carries for the device's check (``--check-samples``)."""
MAX_CHECK_BYTES = 4 * 1024 * 1024
"""Largest check set (inputs and the parent's outputs): fewer rows go when they are large."""


class NoVariantError(BundleError):
    """No variant passed the budget: nothing to bundle. ``reasons``: each method's."""

    def __init__(self, budget: str, reasons: Sequence[tuple[str, str]]) -> None:
        self.reasons = list(reasons)
        listed = "; ".join(f"{method}: {reason}" for method, reason in reasons)
        super().__init__(f"no variant is within the budget ({budget}): {listed or 'none made'}")


@dataclass(frozen=True)
class Optimized:
    """What ``bundle_optimized`` made."""

    bundle: Path
    method: str
    evidence: OptimizeEvidence
    lineage: dict[str, Any]
    """optimize.json as bundled."""


def choose(reports: Sequence[Any], pick: str, executor: str = "cpu-onnx") -> Any:
    """The accepted variant ``pick`` prefers among ``reports`` (edged.optimize's
    ``VariantReport``; the original, method "original", is never chosen): ``smallest``
    (bytes on disk), ``fastest`` (batch-1 latency on ``executor``, else on any executor
    timed), ``best-quality`` (accuracy where labels exist, else top-1 agreement, then the
    lower output error); ties go to the smaller, then to the method named first. None when
    no variant was accepted.

    Raises:
        ValueError: an unknown ``pick``.
    """
    if pick not in PICKS:
        raise ValueError(f"--pick {pick!r} is not one of {', '.join(PICKS)}")
    accepted = [r for r in reports if r.accepted and r.method != "original"]
    if not accepted:
        return None

    def size(r: Any) -> float:
        return float(r.size_bytes) if r.size_bytes is not None else math.inf

    def latency(r: Any) -> float:
        if executor in r.latency_ms:
            return float(r.latency_ms[executor])
        return min(r.latency_ms.values(), default=math.inf)

    def quality(r: Any) -> tuple[float, float]:
        score = r.accuracy if r.accuracy is not None else r.agreement
        error = r.rel_l2_error if r.rel_l2_error is not None else math.inf
        return (-(score if score is not None else -math.inf), error)

    order = {r.method: i for i, r in enumerate(accepted)}
    if pick == "smallest":
        return min(accepted, key=lambda r: (size(r), order[r.method]))
    if pick == "fastest":
        return min(accepted, key=lambda r: (latency(r), size(r), order[r.method]))
    return min(accepted, key=lambda r: (*quality(r), size(r), order[r.method]))


def check_rows(held: Any, reference: dict[str, np.ndarray], primary: str, wanted: int) -> int:
    """How many of the held-out rows go into the check set: at most ``wanted``, fewer when
    the inputs and the parent's ``primary`` output would pass ``MAX_CHECK_BYTES``; at
    least one."""
    n = min(wanted, len(held))
    per_row = sum(a[:1].nbytes for a in held.inputs.values()) + reference[primary][:1].nbytes
    if per_row > 0:
        n = min(n, max(1, MAX_CHECK_BYTES // per_row))
    return max(1, n)


def _variant_outputs(path: Path, inputs: dict[str, np.ndarray], batch: int) -> dict[str, Any]:
    from edged.optimize.data import Samples  # noqa: PLC0415 - the optimize extra
    from edged.optimize.measure import run_outputs  # noqa: PLC0415 - the optimize extra

    return run_outputs(path, Samples(inputs), batch)


def bundle_optimized(
    model: Path,
    calibration: Path | None,
    version: int,
    out_path: Path,
    settings: Any,
    *,
    pick: str = "smallest",
    check_samples: int = DEFAULT_CHECK_SAMPLES,
    work: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    bundle_options: dict[str, Any] | None = None,
) -> tuple[Optimized, Any]:
    """Run ``edged optimize`` on ``model`` with ``calibration`` (None: from
    ``settings.calibration_store``) and ``settings`` (``edged.optimize.run.Settings``),
    choose an accepted variant by ``pick``, and bundle it as ``version`` at ``out_path``
    with its evidence (the module docstring). ``work``: keep the optimiser's output there
    (default: a temporary folder). ``bundle_options``: passed
    to ``build_bundle`` (self-test inputs, tolerances). Returns what was bundled and the
    optimiser's result (every variant's report).

    Raises:
        NoVariantError: no variant passed the budget (each method's reason in it).
        EdgedError: an unusable model, folder or option (named).
    """
    from edged.optimize.run import LINEAGE_FILE, optimize  # noqa: PLC0415 - the optimize extra

    if pick not in PICKS:
        raise BundleError(f"--pick {pick!r} is not one of {', '.join(PICKS)}")
    with tempfile.TemporaryDirectory(prefix="edged-fleet-optimize-") as tmp:
        folder = Path(work) if work is not None else Path(tmp) / "optimized"
        result = optimize(Path(model), calibration, folder, settings, progress)
        chosen = choose(result.reports, pick)
        if chosen is None:
            reasons = [(r.method, r.reason) for r in result.reports[1:]]
            raise NoVariantError(str(result.lineage["budget"]), reasons)
        progress(f"bundling {chosen.method} ({pick} of the accepted variants)")
        assert result.held is not None
        variant_dir = folder / chosen.method / result.name
        staged = Path(tmp) / "version"
        shutil.copytree(variant_dir / "1", staged)
        rows = check_rows(result.held, result.reference, result.primary, check_samples)
        check = result.held.rows(slice(0, rows))
        parent = {result.primary: result.reference[result.primary][:rows]}
        outputs = _variant_outputs(staged / "model.onnx", check.inputs, result.batch)
        drift = compare_outputs(parent[result.primary], outputs[result.primary])
        lineage = dict(json.loads((staged / LINEAGE_FILE).read_text(encoding="utf-8")))
        evidence = OptimizeEvidence(
            file=OPTIMIZE_FILE,
            lineage=LINEAGE_FILE,
            method=chosen.method,
            parent=str(lineage["parent"]["name"]),
            parent_sha256=str(lineage["parent"]["sha256"]),
            calibration_sha256=str(lineage["calibration"]["sha256"]),
            output=result.primary,
            samples=rows,
            agreement=round(drift.agreement, 6),
            rel_l2_error=float(f"{drift.rel_l2_error:.6g}"),
        )
        lineage["parent"].pop("path", None)  # a temporary path on the fleet's machine
        lineage["pick"] = pick
        lineage["check"] = {
            "file": OPTIMIZE_FILE,
            "samples": rows,
            "sha256": check.sha256(),
            "output": result.primary,
            "agreement": evidence.agreement,
            "rel_l2_error": evidence.rel_l2_error,
            "max_abs_error": drift.max_abs_error,
        }
        lineage["variants"] = [r.to_json() for r in result.reports]
        for item in lineage["variants"]:
            item.pop("path", None)
        text = json.dumps(lineage, indent=2, sort_keys=True, default=_jsonable) + "\n"
        (staged / LINEAGE_FILE).write_text(text, encoding="utf-8")
        path = build_bundle(
            variant_dir,
            version,
            out_path,
            source=staged,
            optimize=(evidence, selftest_npz(check.inputs, parent)),
            **(bundle_options or {}),
        )
    return Optimized(path, chosen.method, evidence, json.loads(text)), result


def summary(done: Optimized) -> dict[str, Any]:
    """What ``edged-fleet bundle --optimize --json`` prints about the evidence."""
    return {
        "method": done.method,
        "pick": done.lineage.get("pick"),
        "evidence": asdict(done.evidence),
        "lineage": {k: done.lineage[k] for k in ("parent", "calibration", "holdout", "budget")},
        "check": done.lineage.get("check"),
        "variants": done.lineage.get("variants", []),
    }


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
