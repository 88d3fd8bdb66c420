"""Building model bundles, on the fleet's machine (``edged-fleet bundle``, docs/ota.md).

The bundle format and its checks are the device's (``edged.ota.bundle``: ``parse_manifest``,
``read_manifest``, ``inspect_bundle``, ``check_selftest``); this module writes bundles in that
format, and is the only part of OTA that runs a model through the HAL: it computes a bundle's
expected self-test outputs by running the artifact in-process on a CPU executor.

Rules without I/O: ``manifest_toml``, ``selftest_npz``, ``default_inputs``. I/O around them:
``build_bundle`` (from a model folder), ``write_bundle`` (from bytes). The archive is
deterministic: members sorted, mtime 0, uid/gid 0, no owner names, mode 0644, gzip header
without name or time. The same inputs give the same bytes, hence the same TUF hash.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import numpy as np

from edged.core.errors import EdgedError
from edged.core.types import Array, DataType, Signature, TensorSpec
from edged.ota.bundle import (
    BUNDLE_SCHEMA,
    BUNDLE_TOML,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    INPUT_PREFIX,
    OUTPUT_PREFIX,
    SELFTEST_FILE,
    Manifest,
    OptimizeEvidence,
    check_model_toml,
    parse_manifest,
)
from edged.ota.errors import BundleError
from edged.serving.repository import (
    FORMATS,
    MODEL_TOML,
    ModelSpec,
    detect_format,
    parse_model_toml,
    resolve_signature,
)
from edged.serving.versions import parse_version
from edged.storage import write_atomic
from hal import ExecutorOptions, ModelArtifact, get_executor

#: the CPU executor that computes a format's expected outputs on the fleet's machine; the
#: Edge TPU's and the FPGA's formats need the device itself, so their outputs are given
REFERENCE_EXECUTORS: dict[str, str] = {"onnx": "cpu-onnx", "tflite": "cpu-litert"}
_NPZ_TIME = (1980, 1, 1, 0, 0, 0)


def _toml_string(value: str) -> str:
    # JSON's escapes (\", \\, \n, \uXXXX) are all valid in a TOML basic string
    return json.dumps(value, ensure_ascii=True)


def manifest_toml(manifest: Manifest) -> str:
    """bundle.toml's text for ``manifest`` (which ``parse_manifest`` reads back equal)."""
    lines = [
        f"edged_bundle = {BUNDLE_SCHEMA}",
        f"name = {_toml_string(manifest.name)}",
        f"version = {manifest.version}",
        f"format = {_toml_string(manifest.format)}",
        f"artifacts = [{', '.join(_toml_string(a) for a in manifest.artifacts)}]",
        "",
        "[selftest]",
        f"file = {_toml_string(manifest.selftest_file)}",
        f"rtol = {manifest.rtol!r}",
        f"atol = {manifest.atol!r}",
    ]
    if (evidence := manifest.optimize) is not None:
        lines += ["", "[optimize]"]
        for key in OptimizeEvidence.__dataclass_fields__:
            value = getattr(evidence, key)
            text = _toml_string(value) if isinstance(value, str) else repr(value)
            lines.append(f"{key} = {text}")
    for key, specs in (("inputs", manifest.inputs), ("outputs", manifest.outputs)):
        for spec in specs:
            lines += [
                "",
                f"[[signature.{key}]]",
                f"name = {_toml_string(spec.name)}",
                f"datatype = {_toml_string(spec.datatype.value)}",
                f"shape = [{', '.join(str(d) for d in spec.shape)}]",
            ]
    return "\n".join(lines) + "\n"


def _to_stored(name: str, value: Array) -> Array:
    """An array as selftest.npz stores it: BYTES as fixed-width 'S'."""
    a = np.asarray(value)
    if a.dtype.kind in {"O", "U"}:
        items = []
        for x in a.flat:
            if isinstance(x, bytes):
                items.append(x)
            elif isinstance(x, str):
                items.append(x.encode("utf-8"))
            else:
                raise BundleError(
                    f"self-test tensor {name!r}: an object array must hold bytes, not "
                    f"{type(x).__name__}"
                )
        return np.array(items, dtype=np.bytes_).reshape(a.shape)
    if a.dtype.kind not in "biufS":
        raise BundleError(f"self-test tensor {name!r}: dtype {a.dtype} cannot be stored")
    return a


def selftest_npz(inputs: Mapping[str, Array], expected: Mapping[str, Array]) -> bytes:
    """selftest.npz's bytes, deterministic (members sorted, fixed times, stored).

    Raises:
        BundleError: no input or no expected output, or a tensor numpy cannot store without
            pickling.
    """
    if not inputs or not expected:
        raise BundleError("a self-test needs at least one input and one expected output")
    members = {f"{INPUT_PREFIX}{k}": _to_stored(k, v) for k, v in inputs.items()}
    members |= {f"{OUTPUT_PREFIX}{k}": _to_stored(k, v) for k, v in expected.items()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for key in sorted(members):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_NPZ_TIME)
            info.external_attr = 0o644 << 16
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, members[key], allow_pickle=False)
    return buffer.getvalue()


def default_inputs(signature: Signature) -> dict[str, Array]:
    """Deterministic self-test inputs for ``signature``: dynamic axes 1, numbers drawn from a
    fixed seed (floats in [0, 1), integers 0..9), BYTES b"edged"."""
    rng = np.random.default_rng(0)
    inputs: dict[str, Array] = {}
    for spec in signature.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        dt = spec.datatype
        if dt is DataType.BYTES:
            a = np.full(shape, b"edged", dtype=object)
        elif dt is DataType.BOOL:
            a = rng.random(shape) < 0.5
        elif dt.numpy_dtype.kind == "f":
            a = rng.random(shape).astype(dt.numpy_dtype)
        else:
            a = rng.integers(0, 10, shape).astype(dt.numpy_dtype)
        inputs[spec.name] = a
    return inputs


def _declared(spec: ModelSpec) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None:
    """The signature model.toml declares in full (names, datatypes and dims), else None."""
    batched = (spec.max_batch_size or 0) > 0
    result = []
    for decls in (spec.inputs, spec.outputs):
        if not decls or any(d.datatype is None or d.dims is None for d in decls):
            return None
        result.append(
            tuple(
                TensorSpec(d.name, d.datatype, ((-1,) if batched else ()) + d.dims)  # type: ignore[arg-type, operator]
                for d in decls
            )
        )
    return result[0], result[1]


def _from_tensors(
    spec: ModelSpec, inputs: Mapping[str, Array], outputs: Mapping[str, Array]
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A signature read off the self-test tensors (axis 0 dynamic unless the model does not
    batch): the last resort when neither the artifact nor model.toml says."""
    batched = spec.max_batch_size != 0

    def of(tensors: Mapping[str, Array]) -> tuple[TensorSpec, ...]:
        specs = []
        for name, value in tensors.items():
            a = np.asarray(value)
            shape = tuple(a.shape)
            if batched and shape:
                shape = (-1, *shape[1:])
            specs.append(TensorSpec(name, DataType.from_numpy(a.dtype), shape))
        return tuple(specs)

    return of(inputs), of(outputs)


def _atomic_write(out_path: Path, write: Any) -> None:
    """Write through ``write(file)`` into ``out_path`` atomically and durably."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, write)


def _write_tar(out: IO[bytes], files: Mapping[str, bytes | Path]) -> None:
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(files):
            source = files[name]
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if isinstance(source, Path):
                info.size = source.stat().st_size
                with open(source, "rb") as f:
                    tar.addfile(info, f)
            else:
                info.size = len(source)
                tar.addfile(info, io.BytesIO(source))


def write_bundle(
    out_path: Path,
    *,
    name: str,
    version: int,
    fmt: str,
    artifacts: Mapping[str, bytes | Path],
    model_toml: str,
    inputs: Mapping[str, Array] | None,
    outputs: Mapping[str, Array] | None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    signature: Signature | None = None,
    optimize: tuple[OptimizeEvidence, bytes] | None = None,
) -> Path:
    """Write a bundle from its parts, running nothing: the expected ``outputs`` are taken as
    given; ``inputs`` and ``outputs`` None: no test vectors (the device tests the version
    with its reference sample). ``signature`` (as served) is recorded in bundle.toml;
    without it, model.toml's full declarations, else the self-test tensors. ``optimize``:
    an optimised variant's evidence (bundle.toml ``[optimize]``) and its check set's bytes
    (``selftest_npz`` of the held-out inputs and the parent's outputs). Returns
    ``out_path`` (written atomically).

    Raises:
        BundleError: a part is invalid (named).
    """
    out_path = Path(out_path)
    provisional = parse_manifest(
        {
            "name": name,
            "version": version,
            "format": fmt,
            "artifacts": sorted(artifacts),
            "selftest": {
                "rtol": rtol,
                "atol": atol,
                **({} if inputs is not None else {"file": ""}),
            },
            **({} if optimize is None else {"optimize": asdict(optimize[0])}),
        },
        where=str(out_path),
    )
    spec = check_model_toml(model_toml, provisional, str(out_path))
    if (inputs is None) != (outputs is None):
        raise BundleError(f"{out_path}: self-test inputs and expected outputs go together")
    if signature is not None:
        tensors = (signature.inputs, signature.outputs)
    elif (declared := _declared(spec)) is not None:
        tensors = declared
    elif inputs is not None and outputs is not None:
        tensors = _from_tensors(spec, inputs, outputs)
    else:
        raise BundleError(f"{out_path}: without test vectors, the signature must be given")
    manifest = Manifest(
        name=provisional.name,
        version=provisional.version,
        format=provisional.format,
        artifacts=provisional.artifacts,
        selftest_file=provisional.selftest_file,
        rtol=provisional.rtol,
        atol=provisional.atol,
        inputs=tensors[0],
        outputs=tensors[1],
        optimize=provisional.optimize,
    )
    text = manifest_toml(manifest)
    assert parse_manifest(tomllib.loads(text)) == manifest  # the writer and the reader agree
    files: dict[str, bytes | Path] = {
        BUNDLE_TOML: text.encode("utf-8"),
        MODEL_TOML: model_toml.encode("utf-8"),
        **artifacts,
    }
    if inputs is not None and outputs is not None:
        files[SELFTEST_FILE] = selftest_npz(inputs, outputs)
    if optimize is not None:
        files[optimize[0].file] = optimize[1]
    _atomic_write(out_path, lambda f: _write_tar(f, files))
    return out_path


def _version_files(source: Path, fmt: str) -> dict[str, Path]:
    if not source.is_dir():
        raise BundleError(f"{source} is not a folder (the version folder to bundle)")
    files: dict[str, Path] = {}
    for p in sorted(source.iterdir()):
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"{p}: a bundle holds regular files only (no folders or links)")
        files[p.name] = p
    needed = FORMATS[fmt][0]
    if needed not in files:
        raise BundleError(f"{source} holds no {needed}, the artifact of a {fmt} model")
    return files


def build_bundle(
    model_dir: Path,
    version: int,
    out_path: Path,
    selftest_inputs: Mapping[str, Array] | None = None,
    *,
    source: Path | None = None,
    expected: Mapping[str, Array] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    selftest: bool = True,
    optimize: tuple[OptimizeEvidence, bytes] | None = None,
) -> Path:
    """Bundle ``model_dir`` (its model.toml, empty when it has none, and every file of its
    version folder ``source``, by default ``model_dir``/``version``) as ``version``.
    Without model.toml (or its ``format``) the artifact in the folder decides the format.
    ``selftest`` False: no test vectors; the device tests the new version with the
    reference sample of the version it serves (its first warm-up sample that ran, or its
    first request that succeeded). ``optimize``: as ``write_bundle``'s.

    For formats a CPU executor runs (onnx: cpu-onnx, tflite: cpu-litert) the artifact is
    loaded in-process through the HAL: its signature, narrowed by model.toml as the daemon
    does, is recorded, and the expected outputs are what it answers to ``selftest_inputs``
    (default: ``default_inputs`` of its signature), unless ``expected`` gives them. For the
    other formats ``selftest_inputs`` and ``expected`` must be given, and the signature is
    model.toml's declarations (else the self-test tensors).

    Raises:
        BundleError: the folder, model.toml, the artifact or the self-test is unusable; a
            model that fails to load or run is named with the cause.
    """
    # resolved first: the model's name defaults to its folder's, which "." does not have
    model_dir, out_path = Path(model_dir).resolve(), Path(out_path)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"version must be an integer >= 1, not {version!r}")
    toml_path = model_dir / MODEL_TOML
    folder = Path(source) if source is not None else model_dir / str(version)
    try:
        model_toml = toml_path.read_text(encoding="utf-8") if toml_path.exists() else ""
        data = tomllib.loads(model_toml)
        fmt = data.get("format") or (detect_format(folder) if folder.is_dir() else "onnx")
        spec = parse_model_toml(model_dir, data, fmt)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, EdgedError) as e:
        raise BundleError(f"{toml_path}: {e}") from e
    if source is None and not folder.is_dir():
        present = sorted(
            p.name for p in model_dir.iterdir() if p.is_dir() and parse_version(p.name)
        )
        raise BundleError(
            f"{folder} does not exist (version folders: {', '.join(present) or 'none'}); "
            f"to bundle another folder's artifact as version {version}, give it as the source "
            "(--source)"
        )
    files = _version_files(folder, spec.format)
    signature: Signature | None = None
    kind = REFERENCE_EXECUTORS.get(spec.format)
    if kind is not None:
        artifact = ModelArtifact(folder / spec.artifact_name, spec.format)
        try:
            loaded = get_executor(kind).load(artifact, ExecutorOptions())
        except EdgedError as e:
            raise BundleError(f"{artifact.path}: cannot load it with {kind}: {e}") from e
        try:
            try:
                served = resolve_signature(loaded.signature, spec, default_max_batch_size=1)
            except EdgedError as e:
                raise BundleError(f"{toml_path} disagrees with the artifact: {e}") from e
            signature = Signature(served.inputs, served.outputs, served.max_batch_size)
            if selftest and selftest_inputs is None:
                selftest_inputs = default_inputs(loaded.signature)
            if selftest and expected is None:
                assert selftest_inputs is not None
                try:
                    expected = loaded.infer(dict(selftest_inputs))
                except EdgedError as e:
                    raise BundleError(
                        f"{artifact.path}: running it on the self-test inputs failed: {e}; "
                        "give inputs it takes (--selftest-input), or bundle it without test "
                        "vectors (--no-selftest: the device tests it with its reference sample)"
                    ) from e
        finally:
            loaded.close()
    elif selftest and (selftest_inputs is None or expected is None):
        raise BundleError(
            f"{spec.format} models do not run on this machine's CPU executors: give the "
            "self-test inputs and their expected outputs (--selftest-input, --selftest-output), "
            "or --no-selftest"
        )
    if not selftest:
        selftest_inputs = expected = None
    return write_bundle(
        out_path,
        name=spec.name,
        version=version,
        fmt=spec.format,
        artifacts=files,
        model_toml=model_toml,
        inputs=selftest_inputs,
        outputs=expected,
        rtol=rtol,
        atol=atol,
        signature=signature,
        optimize=optimize,
    )
