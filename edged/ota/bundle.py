"""The model bundle: one ``.tar.gz`` per model version, what the fleet publishes and a device
installs.

::

    bundle.toml     edged_bundle = 1, name, version, format, artifacts = [file names],
                    [selftest] file, rtol, atol; [[signature.inputs]] / [[signature.outputs]]
    model.toml      the model's model.toml (edged.serving.repository rules)
    <artifacts>     e.g. model.onnx; for a pynq-bundle every file of the version folder
    selftest.npz    "in:<tensor>" inputs and "out:<tensor>" expected outputs (.npy members,
                    no pickles; BYTES tensors as fixed-width 'S' arrays); optional: a bundle
                    built without test vectors says ``[selftest] file = ""``, and the device
                    tests the new version with its reference sample instead
    optimize.npz    only in a bundle of an ``edged optimize`` variant (bundle.toml
                    ``[optimize]``): held-out inputs never used for calibration and the
                    *parent* model's outputs to them ("in:"/"out:" as selftest.npz); the
                    device runs the variant on them and refuses it when its top-1 agreement
                    with the parent or its output error drifts beyond what the fleet
                    recorded (``check_optimized``). ``[optimize] lineage`` names the
                    artifact (optimize.json) holding the lineage and every variant's figures

The fleet builds bundles (``edged.fleet.build``, which runs the artifact through the HAL to
compute the expected outputs); this module is the format and its checks, as a device needs
them, and imports nothing of the HAL.

Rules without I/O: ``parse_manifest``, ``check_model_toml``, ``check_for_model``,
``check_selftest``, ``check_like_reference``, ``compare_outputs``, ``check_optimized``. I/O
around them: ``read_manifest``, ``inspect_bundle`` (a whole archive checked in memory, as a
device will and as ``edged-fleet publish`` does first), ``load_selftest``,
``load_optimize_check``.
"""

from __future__ import annotations

import io
import math
import re
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from edged.core.errors import EdgedError
from edged.core.types import Array, DataType, TensorSpec
from edged.ota import archive
from edged.ota.errors import BundleError, OtaError, SelfTestError
from edged.serving.repository import FORMATS, MODEL_TOML, ModelSpec, parse_model_toml

BUNDLE_TOML = "bundle.toml"
SELFTEST_FILE = "selftest.npz"
BUNDLE_SCHEMA = 1
"""``edged_bundle`` in bundle.toml: the version of this format."""

DEFAULT_RTOL = 1e-3
"""Relative tolerance of the self-test: catches a wrong or corrupt model, not the rounding
differences between CPUs and runtimes."""
DEFAULT_ATOL = 1e-5
"""Absolute tolerance of the self-test."""

MAX_SELFTEST_BYTES = 64 * 1024 * 1024
"""Largest unpacked selftest.npz read."""
MAX_TOML_BYTES = 1024 * 1024
"""Largest bundle.toml or model.toml read from an archive into memory."""
OPTIMIZE_FILE = "optimize.npz"
"""The held-out check set of an optimised variant (``[optimize] file``)."""
MAX_OPTIMIZE_BYTES = 16 * 1024 * 1024
"""Largest unpacked optimize.npz read: the check set is a few dozen samples, bounded by
``edged-fleet bundle --optimize`` to 4 MiB."""


INPUT_PREFIX, OUTPUT_PREFIX = "in:", "out:"
"""selftest.npz members: ``in:<tensor>.npy`` inputs, ``out:<tensor>.npy`` expected outputs."""
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


_MANIFEST_KEYS = {
    "edged_bundle",
    "name",
    "version",
    "format",
    "artifacts",
    "selftest",
    "signature",
    "optimize",
}


@dataclass(frozen=True)
class OptimizeEvidence:
    """bundle.toml ``[optimize]``: where a bundle of an ``edged optimize`` variant came from,
    and the quality the fleet recorded for it on the held-out check set (``file``), which
    the device's self-test must reproduce on its own executor."""

    file: str
    """The check set: held-out inputs and the parent's outputs to them."""
    lineage: str
    """The artifact holding the lineage and every variant's figures (optimize.json)."""
    method: str
    parent: str
    """The parent model's name."""
    parent_sha256: str
    """SHA-256 of the parent's model file."""
    calibration_sha256: str
    """SHA-256 of the calibration set (edged.optimize.data.Samples.sha256)."""
    output: str
    """The output quality is judged on (top-1 decisions, output error)."""
    samples: int
    """Rows in the check set."""
    agreement: float
    """Top-1 agreement with the parent on the check set, as recorded on the fleet."""
    rel_l2_error: float
    """``||variant - parent|| / ||parent||`` of ``output`` on the check set, as recorded."""


@dataclass(frozen=True)
class Manifest:
    """bundle.toml, validated."""

    name: str
    version: int
    format: str
    artifacts: tuple[str, ...]
    selftest_file: str = SELFTEST_FILE
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    inputs: tuple[TensorSpec, ...] = ()
    """The model's inputs as served (-1: a dynamic axis), recorded when the bundle was built."""
    outputs: tuple[TensorSpec, ...] = ()
    optimize: OptimizeEvidence | None = None
    """Set in a bundle of an ``edged optimize`` variant."""

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the archive holds, sorted."""
        selftest = {self.selftest_file} if self.selftest_file else set()
        check = {self.optimize.file} if self.optimize is not None else set()
        return tuple(sorted({BUNDLE_TOML, MODEL_TOML, *selftest, *check, *self.artifacts}))


@dataclass(frozen=True)
class BundleInfo:
    """A bundle archive checked whole: its manifest, its model.toml and its self-test."""

    manifest: Manifest
    model: ModelSpec
    selftest_inputs: tuple[str, ...]
    selftest_outputs: tuple[str, ...]
    archive_bytes: int


# -- rules (no I/O) --------------------------------------------------------------------------


def _fail(where: str, message: str) -> BundleError:
    return BundleError(f"{where}: {message}")


def _plain_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 128 and _NAME.fullmatch(value) is not None


def _tolerance(where: str, key: str, value: object, table: str = "selftest") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"'{table}.{key}' must be a number")
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise _fail(where, f"'{table}.{key}' must be finite and >= 0, not {value!r}")
    return number


def _tensors(where: str, key: str, raw: object) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list):
        raise _fail(where, f"'signature.{key}' must be an array of tables")
    specs = []
    for i, item in enumerate(raw):
        at = f"signature.{key}[{i}]"
        if not isinstance(item, dict) or set(item) != {"name", "datatype", "shape"}:
            raise _fail(where, f"'{at}' must be a table of name, datatype and shape")
        name, datatype, shape = item["name"], item["datatype"], item["shape"]
        if not isinstance(name, str) or not name:
            raise _fail(where, f"'{at}.name' must be a non-empty string")
        if datatype not in DataType.__members__:
            raise _fail(where, f"'{at}.datatype' {datatype!r} is not a KServe datatype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise _fail(where, f"'{at}.shape' must be a list of integers >= -1")
        specs.append(TensorSpec(name, DataType(datatype), tuple(shape)))
    return tuple(specs)


def _selftest_file(where: str, selftest: object) -> str:
    if not isinstance(selftest, dict):
        raise _fail(where, "'selftest' must be a table")
    unknown = set(selftest) - {"file", "rtol", "atol"}
    if unknown:
        raise _fail(where, f"unknown key 'selftest.{sorted(unknown)[0]}'")
    name = selftest.get("file", SELFTEST_FILE)
    if name == "":
        return ""  # no test vectors: the device tests with its reference sample
    if not _plain_name(name) or not str(name).endswith(".npz"):
        raise _fail(where, f"'selftest.file' {name!r} is not a plain .npz file name")
    return str(name)


def _artifacts(where: str, fmt: str, artifacts: object, selftest_file: str) -> tuple[str, ...]:
    if not isinstance(artifacts, list) or not artifacts:
        raise _fail(where, "'artifacts' must be a non-empty list of file names")
    for a in artifacts:
        if not _plain_name(a):
            raise _fail(where, f"artifact {a!r} is not a plain file name ([A-Za-z0-9._-])")
        if a in {BUNDLE_TOML, MODEL_TOML, selftest_file}:
            raise _fail(where, f"artifact {a!r} has the name of a bundle file")
    if len(set(artifacts)) != len(artifacts):
        raise _fail(where, "'artifacts' lists a file twice")
    expected_artifact = FORMATS[fmt][0]
    if expected_artifact not in artifacts:
        raise _fail(where, f"a {fmt} bundle must hold {expected_artifact} in 'artifacts'")
    return tuple(sorted(artifacts))


_EVIDENCE_STRINGS = ("method", "parent", "parent_sha256", "calibration_sha256", "output")


def _evidence(
    where: str, raw: object, artifacts: tuple[str, ...], taken: set[str]
) -> OptimizeEvidence:
    if not isinstance(raw, dict):
        raise _fail(where, "'optimize' must be a table")
    fields = set(OptimizeEvidence.__dataclass_fields__)
    unknown = set(raw) - fields
    if unknown:
        raise _fail(where, f"unknown key 'optimize.{sorted(unknown)[0]}'")
    missing = fields - set(raw)
    if missing:
        raise _fail(where, f"'optimize.{sorted(missing)[0]}' is missing")
    file, lineage = raw["file"], raw["lineage"]
    if not _plain_name(file) or not str(file).endswith(".npz") or file in taken:
        raise _fail(where, f"'optimize.file' {file!r} is not a plain .npz file name of its own")
    if lineage not in artifacts:
        raise _fail(where, f"'optimize.lineage' {lineage!r} is not one of the artifacts")
    for key in _EVIDENCE_STRINGS:
        if not isinstance(raw[key], str) or not raw[key]:
            raise _fail(where, f"'optimize.{key}' must be a non-empty string")
    samples = raw["samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise _fail(where, f"'optimize.samples' must be an integer >= 1, not {samples!r}")
    agreement = _tolerance(where, "agreement", raw["agreement"], "optimize")
    if agreement > 1:
        raise _fail(where, f"'optimize.agreement' must be within [0, 1], not {agreement!r}")
    return OptimizeEvidence(
        file=str(file),
        lineage=str(lineage),
        samples=samples,
        agreement=agreement,
        rel_l2_error=_tolerance(where, "rel_l2_error", raw["rel_l2_error"], "optimize"),
        **{key: str(raw[key]) for key in _EVIDENCE_STRINGS},
    )


def parse_manifest(data: Mapping[str, Any], where: str = BUNDLE_TOML) -> Manifest:
    """Validate bundle.toml's ``data``.

    Raises:
        BundleError: an unknown key, a missing one or a bad value, named.
    """
    unknown = set(data) - _MANIFEST_KEYS
    if unknown:
        raise _fail(where, f"unknown key '{sorted(unknown)[0]}'")
    schema = data.get("edged_bundle", BUNDLE_SCHEMA)
    if isinstance(schema, bool) or schema != BUNDLE_SCHEMA:
        raise _fail(where, f"'edged_bundle' is {schema!r}; this edged reads {BUNDLE_SCHEMA}")
    name = data.get("name")
    if not _plain_name(name):
        raise _fail(where, f"'name' {name!r} is not a model name ([A-Za-z0-9._-], 128 at most)")
    assert isinstance(name, str)
    raw_version = data.get("version")
    version = (
        raw_version if isinstance(raw_version, int) and not isinstance(raw_version, bool) else None
    )
    if version is None or version < 1:
        raise _fail(where, f"'version' must be an integer >= 1, not {raw_version!r}")
    fmt = data.get("format")
    if fmt not in FORMATS:
        raise _fail(where, f"'format' {fmt!r} is not one of {', '.join(FORMATS)}")
    assert isinstance(fmt, str)
    selftest = data.get("selftest", {})
    selftest_file = _selftest_file(where, selftest)
    artifacts = _artifacts(where, fmt, data.get("artifacts"), selftest_file)
    signature = data.get("signature", {})
    if not isinstance(signature, dict) or set(signature) - {"inputs", "outputs"}:
        raise _fail(where, "'signature' must be a table of 'inputs' and 'outputs'")
    optimize = None
    if "optimize" in data:
        if not selftest_file:
            raise _fail(where, "an [optimize] bundle needs its self-test ('selftest.file')")
        taken = {BUNDLE_TOML, MODEL_TOML, selftest_file, *artifacts}
        optimize = _evidence(where, data["optimize"], artifacts, taken)
    return Manifest(
        name=name,
        version=version,
        format=fmt,
        artifacts=artifacts,
        selftest_file=selftest_file,
        rtol=_tolerance(where, "rtol", selftest.get("rtol", DEFAULT_RTOL)),
        atol=_tolerance(where, "atol", selftest.get("atol", DEFAULT_ATOL)),
        inputs=_tensors(where, "inputs", signature.get("inputs", [])),
        outputs=_tensors(where, "outputs", signature.get("outputs", [])),
        optimize=optimize,
    )


def signature_table(manifest: Manifest) -> dict[str, list[dict[str, Any]]]:
    """The recorded signature as plain data (JSON-ready)."""
    return {
        key: [{"name": s.name, "datatype": s.datatype.value, "shape": list(s.shape)} for s in specs]
        for key, specs in (("inputs", manifest.inputs), ("outputs", manifest.outputs))
    }


def _from_stored(a: Array) -> Array:
    """An array as edged holds it: 'S' back to an object array of bytes."""
    if a.dtype.kind != "S":
        return a
    out = np.empty(a.shape, dtype=object)
    for i, x in enumerate(a.flat):
        out.flat[i] = bytes(x)
    return out


def check_selftest(
    expected: Mapping[str, Array], outputs: Mapping[str, Array], rtol: float, atol: float
) -> None:
    """Compare a model's ``outputs`` with the bundle's ``expected`` outputs: each must be
    present, of the same shape, and within ``|out - exp| <= atol + rtol * |exp|`` (NaN equals
    NaN); BYTES must be equal. Outputs not expected are ignored.

    Raises:
        SelfTestError: naming the output and what differs (for numbers, how many elements,
            the largest error and where).
    """
    for name, want_raw in expected.items():
        if name not in outputs:
            returned = ", ".join(outputs) or "nothing"
            raise SelfTestError(f"self-test: the model returned no output {name!r} ({returned})")
        want, got = np.asarray(want_raw), np.asarray(outputs[name])
        if got.shape != want.shape:
            raise SelfTestError(
                f"self-test: output {name!r} has shape {list(got.shape)}, expected "
                f"{list(want.shape)}"
            )
        if want.dtype.kind in "OSU" or got.dtype.kind in "OSU":
            _check_bytes(name, want, got)
            continue
        if got.dtype.kind not in "biuf" or want.dtype.kind not in "biuf":
            raise SelfTestError(f"self-test: output {name!r} is {got.dtype}, expected {want.dtype}")
        g, w = got.astype(np.float64), want.astype(np.float64)
        close = np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
        if close.all():
            continue
        error = np.where(close, 0.0, np.abs(g - w))
        error = np.where(np.isnan(error), np.inf, error)
        worst = np.unravel_index(int(np.argmax(error)), error.shape)
        index = tuple(int(i) for i in worst)
        raise SelfTestError(
            f"self-test: output {name!r} differs from the expected output at "
            f"{int((~close).sum())} of {close.size} elements: max abs error "
            f"{float(error[worst]):.6g} at index {list(index)} (got {g[worst]!r}, expected "
            f"{w[worst]!r}; rtol {rtol:g}, atol {atol:g})"
        )


def check_like_reference(reference: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
    """The self-test of a bundle without test vectors: the new version's ``outputs`` to the
    reference sample must have the outputs the serving version gave it (``reference``),
    with the same dtypes and shapes, and finite numbers. Values may differ: new weights
    answer differently.

    Raises:
        SelfTestError: naming the output and what differs.
    """
    if set(outputs) != set(reference):
        raise SelfTestError(
            f"self-test (reference sample): the model returned {sorted(outputs)}, the serving "
            f"version {sorted(reference)}"
        )
    for name, want_raw in reference.items():
        want, got = np.asarray(want_raw), np.asarray(outputs[name])
        if got.dtype != want.dtype or got.shape != want.shape:
            raise SelfTestError(
                f"self-test (reference sample): output {name!r} is {got.dtype}{list(got.shape)}, "
                f"the serving version's {want.dtype}{list(want.shape)}"
            )
        if got.dtype.kind in "fc" and not np.isfinite(got).all():
            bad = int((~np.isfinite(got)).sum())
            raise SelfTestError(
                f"self-test (reference sample): output {name!r} has {bad} of {got.size} "
                "values that are not finite"
            )


UNIT_SLACK = 1e-5
"""How far outside [0, 1] a probability output may round and still be decided at 0.5 (PP-OCR's
detector's sigmoid map reaches 1.0000001: decided at 0 instead, its agreement with an
identical variant read 0.984)."""


def decisions(output: Array) -> Array:
    """The decision per element that top-1 agreement counts: an integer (or bool) output
    as it is; a float output whose axis 1 has more than one entry (class scores ``[N, C]``,
    or a ``[N, C, H, W]`` map) its argmax over axis 1; otherwise (one score, a one-channel
    map) which side of 0.5 (values in [0, 1], give or take :data:`UNIT_SLACK`: a float32
    sigmoid can round to 1.0000001) or of 0 each element lies on. The same rule judges a
    variant in ``edged optimize`` and on the device."""
    output = np.asarray(output)
    if np.issubdtype(output.dtype, np.integer) or output.dtype == np.bool_:
        return output
    if output.ndim >= 2 and output.shape[1] > 1:
        top: Array = np.argmax(output, axis=1)
        return top
    unit = output.size and output.min() >= -UNIT_SLACK and output.max() <= 1 + UNIT_SLACK
    threshold = 0.5 if unit else 0.0
    decided: Array = output > threshold
    return decided


@dataclass(frozen=True)
class Drift:
    """A variant's ``output`` against its parent's on the same inputs."""

    agreement: float
    """Share of equal decisions (``decisions``), in [0, 1]."""
    rel_l2_error: float
    """``||variant - parent|| / ||parent||`` (0 for a non-float output)."""
    max_abs_error: float


def compare_outputs(parent: Array, variant: Array) -> Drift:
    """How far ``variant`` (one output) drifts from ``parent`` (the same output of the parent
    model on the same inputs).

    Raises:
        SelfTestError: the shapes differ.
    """
    want, got = np.asarray(parent), np.asarray(variant)
    if want.shape != got.shape:
        raise SelfTestError(
            f"optimize check: the output has shape {list(got.shape)}, the parent's "
            f"{list(want.shape)}"
        )
    a, b = decisions(want), decisions(got)
    agreement = float(np.mean(a == b)) if a.size else 1.0
    if want.dtype.kind != "f":
        return Drift(agreement, 0.0, 0.0)
    d = got.astype(np.float64) - want.astype(np.float64)
    norm = float(np.sqrt(np.sum(want.astype(np.float64) ** 2)))
    rel = float(np.sqrt(np.sum(d * d))) / max(norm, 1e-30)
    worst = float(np.max(np.abs(d))) if d.size else 0.0
    if not (math.isfinite(rel) and math.isfinite(worst)):
        rel = worst = math.inf
    return Drift(agreement, rel, worst)


def check_optimized(
    evidence: OptimizeEvidence,
    parent: Mapping[str, Array],
    outputs: Mapping[str, Array],
    agreement_slack: float,
    error_slack: float,
) -> Drift:
    """The device's check of an optimised variant: its ``outputs`` on the check set against
    the ``parent``'s outputs stored with it. The top-1 agreement may fall at most
    ``agreement_slack`` below the recorded one, the relative output error rise at most
    ``error_slack`` above it (ota.optimize_agreement_slack, ota.optimize_error_slack).
    Returns the drift measured.

    Raises:
        SelfTestError: naming the figure, the value measured, what was recorded and the
            tolerance.
    """
    name = evidence.output
    if name not in parent:
        raise SelfTestError(f"optimize check: {evidence.file} holds no parent output {name!r}")
    if name not in outputs:
        returned = ", ".join(outputs) or "nothing"
        raise SelfTestError(f"optimize check: the model returned no output {name!r} ({returned})")
    drift = compare_outputs(parent[name], outputs[name])
    rows = int(np.asarray(parent[name]).shape[0]) if np.asarray(parent[name]).ndim else 1
    floor = evidence.agreement - agreement_slack
    if drift.agreement < floor - 1e-12:
        raise SelfTestError(
            f"optimize check: {evidence.method} variant's top-1 agreement with its parent "
            f"{evidence.parent} on output {name!r} is {drift.agreement:.4f} on {rows} held-out "
            f"samples, below the {evidence.agreement:.4f} recorded when it was optimised minus "
            f"ota.optimize_agreement_slack {agreement_slack:g}"
        )
    ceiling = evidence.rel_l2_error + error_slack
    if drift.rel_l2_error > ceiling + 1e-12:
        raise SelfTestError(
            f"optimize check: {evidence.method} variant's relative output error against its "
            f"parent {evidence.parent} on output {name!r} is {drift.rel_l2_error:.4g} on "
            f"{rows} held-out samples, above the {evidence.rel_l2_error:.4g} recorded when it "
            f"was optimised plus ota.optimize_error_slack {error_slack:g}"
        )
    return drift


def _check_bytes(name: str, want: Array, got: Array) -> None:
    def as_bytes(x: object) -> object:
        return x.encode("utf-8") if isinstance(x, str) else bytes(x) if isinstance(x, bytes) else x

    wrong = [
        i
        for i, (w, g) in enumerate(zip(want.flat, got.flat, strict=True))
        if as_bytes(w) != as_bytes(g)
    ]
    if wrong:
        first = np.unravel_index(wrong[0], want.shape)
        raise SelfTestError(
            f"self-test: output {name!r} differs from the expected output at {len(wrong)} of "
            f"{want.size} elements, first at index {[int(i) for i in first]} "
            f"(got {as_bytes(got.flat[wrong[0]])!r}, expected {as_bytes(want.flat[wrong[0]])!r})"
        )


def check_model_toml(text: str, manifest: Manifest, where: str) -> ModelSpec:
    """Validate a bundle's model.toml ``text`` against its ``manifest`` (same format).

    Raises:
        BundleError: invalid TOML, an invalid model.toml, or another format, named.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _fail(where, f"model.toml is not valid TOML: {e}") from e
    try:
        spec = parse_model_toml(Path(manifest.name), data, manifest.format)
    except EdgedError as e:
        raise _fail(where, f"model.toml: {e}") from e
    if spec.format != manifest.format:
        raise _fail(
            where, f"model.toml says format {spec.format!r}, bundle.toml {manifest.format!r}"
        )
    return spec


def check_for_model(manifest: Manifest, model: str, version: int, spec: ModelSpec) -> None:
    """Check that an unpacked bundle is the update asked for: ``model`` at ``version``, in the
    format of the model's model.toml (``spec``), carrying its artifact.

    Raises:
        OtaError: it names another model, version or format, or lacks the artifact.
    """
    if manifest.name != model:
        raise OtaError(f"bundle.toml names model {manifest.name!r}, not {model!r}")
    if manifest.version != version:
        raise OtaError(f"bundle.toml says version {manifest.version}, not {version}")
    if manifest.format != spec.format:
        raise OtaError(
            f"bundle.toml says format {manifest.format!r}; model.toml says {spec.format!r}"
        )
    if spec.artifact_name not in manifest.artifacts:
        raise OtaError(
            f"the bundle lacks {spec.artifact_name}, the artifact of a {spec.format} model"
        )


def read_manifest(bundle: Path, limits: archive.Limits = archive.Limits()) -> Manifest:  # noqa: B008
    """bundle.toml of an unpacked bundle folder, or of a bundle archive (read in memory).

    Raises:
        BundleError: bundle.toml is missing or invalid.
        UnsafeArchiveError: the archive breaks a rule of ``archive.scan``.
    """
    bundle = Path(bundle)
    where = f"{bundle}/{BUNDLE_TOML}"
    if bundle.is_dir():
        try:
            raw = (bundle / BUNDLE_TOML).read_bytes()
        except OSError as e:
            raise _fail(where, f"cannot read it: {e}") from e
    else:
        found = archive.read_files(bundle, [BUNDLE_TOML], MAX_TOML_BYTES, limits)
        if BUNDLE_TOML not in found:
            raise _fail(where, "the archive has no bundle.toml")
        raw = found[BUNDLE_TOML]
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise _fail(where, f"not valid TOML: {e}") from e
    return parse_manifest(data, where)


def _load_npz(
    source: Path | IO[bytes], where: str, max_bytes: int
) -> tuple[dict[str, Array], dict[str, Array]]:
    try:
        with zipfile.ZipFile(source) as z:
            entries = z.infolist()
        total = sum(e.file_size for e in entries)
        if total > max_bytes:
            raise _fail(where, f"unpacks to {total} bytes, above the limit of {max_bytes}")
        keys = []
        for e in entries:
            key = e.filename.removesuffix(".npy")
            if e.filename == key or not key.startswith((INPUT_PREFIX, OUTPUT_PREFIX)):
                raise _fail(
                    where, f"member {e.filename!r} is not in:<tensor>.npy or out:<tensor>.npy"
                )
            keys.append(key)
        if isinstance(source, io.IOBase):
            source.seek(0)
        inputs: dict[str, Array] = {}
        outputs: dict[str, Array] = {}
        with np.load(source, allow_pickle=False) as npz:
            for key in keys:
                array = _from_stored(npz[key])
                if key.startswith(INPUT_PREFIX):
                    inputs[key.removeprefix(INPUT_PREFIX)] = array
                else:
                    outputs[key.removeprefix(OUTPUT_PREFIX)] = array
    except BundleError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise _fail(where, f"not a readable self-test (.npz without pickles): {e}") from e
    if not inputs or not outputs:
        raise _fail(where, "needs at least one 'in:' input and one 'out:' expected output")
    return inputs, outputs


def load_selftest(
    path: Path, max_bytes: int = MAX_SELFTEST_BYTES
) -> tuple[dict[str, Array], dict[str, Array]]:
    """The self-test of an unpacked bundle: (inputs, expected outputs), BYTES as object arrays
    of bytes. The tolerances are bundle.toml's (``read_manifest``).

    Raises:
        BundleError: the file is missing, not an .npz without pickles, too large, or holds a
            member that is neither an input nor an expected output.
    """
    return _load_npz(Path(path), str(path), max_bytes)


def load_optimize_check(
    path: Path, max_bytes: int = MAX_OPTIMIZE_BYTES
) -> tuple[dict[str, Array], dict[str, Array]]:
    """An unpacked bundle's optimize check set: (held-out inputs, the parent's outputs).

    Raises:
        BundleError: as ``load_selftest``.
    """
    return _load_npz(Path(path), str(path), max_bytes)


def inspect_bundle(
    bundle: Path,
    limits: archive.Limits = archive.Limits(),  # noqa: B008
) -> BundleInfo:
    """Check a bundle archive whole, in memory, as a device will: the archive rules, bundle.toml,
    model.toml (valid, same name and format), exactly the files bundle.toml lists, and a
    readable self-test whose inputs match the recorded signature.

    Raises:
        UnsafeArchiveError: the archive breaks a rule of ``archive.scan``.
        BundleError: anything else, named.
    """
    bundle = Path(bundle)
    listing = archive.scan(bundle, limits)
    manifest = read_manifest(bundle, limits)
    where = str(bundle)
    present = sorted(m.name for m in listing)
    if present != list(manifest.files):
        raise _fail(
            where,
            f"holds {present}; bundle.toml and the bundle format say {list(manifest.files)}",
        )
    found = archive.read_files(bundle, [MODEL_TOML], MAX_TOML_BYTES, limits)
    try:
        model_toml = found[MODEL_TOML].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(where, f"model.toml is not UTF-8: {e}") from e
    spec = check_model_toml(model_toml, manifest, where)
    inputs: dict[str, Array] = {}
    outputs: dict[str, Array] = {}
    if manifest.selftest_file:
        npz = archive.read_files(bundle, [manifest.selftest_file], MAX_SELFTEST_BYTES, limits)
        inputs, outputs = _load_npz(
            io.BytesIO(npz[manifest.selftest_file]),
            f"{where}/{manifest.selftest_file}",
            MAX_SELFTEST_BYTES,
        )
    if manifest.inputs and manifest.selftest_file:
        declared = sorted(s.name for s in manifest.inputs)
        if sorted(inputs) != declared:
            raise _fail(
                where,
                f"the self-test gives inputs {sorted(inputs)}; the model takes {declared}",
            )
    if manifest.optimize is not None:
        _inspect_check(bundle, manifest, manifest.optimize, limits)
    return BundleInfo(
        manifest=manifest,
        model=spec,
        selftest_inputs=tuple(sorted(inputs)),
        selftest_outputs=tuple(sorted(outputs)),
        archive_bytes=listing.archive_bytes,
    )


def _inspect_check(
    bundle: Path, manifest: Manifest, evidence: OptimizeEvidence, limits: archive.Limits
) -> None:
    where = f"{bundle}/{evidence.file}"
    npz = archive.read_files(bundle, [evidence.file], MAX_OPTIMIZE_BYTES, limits)
    inputs, parent = _load_npz(io.BytesIO(npz[evidence.file]), where, MAX_OPTIMIZE_BYTES)
    if manifest.inputs and sorted(inputs) != sorted(s.name for s in manifest.inputs):
        raise _fail(
            where,
            f"gives inputs {sorted(inputs)}; the model takes "
            f"{sorted(s.name for s in manifest.inputs)}",
        )
    if evidence.output not in parent:
        raise _fail(where, f"holds no parent output {evidence.output!r} ('optimize.output')")
    rows = {int(np.asarray(a).shape[0]) if np.asarray(a).ndim else 1 for a in inputs.values()}
    if rows != {evidence.samples}:
        raise _fail(where, f"holds {sorted(rows)} rows; 'optimize.samples' says {evidence.samples}")
