"""Build the example OCR pipeline: PP-OCR's text detector -> a crop of the text -> PP-OCR's
direction classifier, with the code between them (normalisation, crop, resize) as small ONNX
models written with ``onnx.helper`` (no Python in the serving path). See docs/pipelines.md.

    .venv/bin/python models/build_pipeline.py --out REPO --det DET.onnx --cls CLS.onnx

writes REPO/ocr_pre, ocr_det, ocr_crop, ocr_cls (each ``1/model.onnx``) and REPO/ocr (the
pipeline's model.toml). The detector and classifier are the files rapidocr-onnxruntime's
wheel ships (``ch_PP-OCRv4_det_infer.onnx``, ``ch_ppocr_mobile_v2.0_cls_infer.onnx``; tests
fetch them with tests/corpus.py); the two helper models are a few hundred bytes each and are
rebuilt here byte-identically (opset 17, IR 8, like models/build.py), each checked against a
numpy reference before it is written.

- ``ocr_pre``: image UINT8 [N, H, W, 3] (RGB) -> ``det_input`` FP32 [N, 3, H, W] (ImageNet
  mean/std, what the detector takes) and ``cls_image`` FP32 [N, 3, H, W] ((x/255 - 0.5)/0.5,
  what the classifier takes). H and W must be multiples of 32 for the detector.
- ``ocr_crop``: ``image`` FP32 [1, 3, H, W] and the detector's ``prob`` FP32 [1, 1, H, W] ->
  ``crop`` FP32 [1, 3, 48, 192]: the bounding box of every pixel whose text probability is
  above 0.3 (the whole image when none is), bilinearly resized to the classifier's input.
  Not batchable (axis 0 is 1): the box is per image.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "edged models/build_pipeline.py"
#: PP-OCR's direction classifier input: height, width
CLS_SIZE = (48, 192)
#: a pixel is text above this probability (PP-OCR's det_db_thresh)
TEXT_THRESHOLD = 0.3
DET_MEAN = (0.485, 0.456, 0.406)
DET_STD = (0.229, 0.224, 0.225)

#: the pipeline's model.toml: tensors flow image -> ocr_pre -> ocr_det -> ocr_crop -> ocr_cls
OCR_PIPELINE_TOML = """\
# PP-OCR text direction: detect text, crop it, classify 0 / 180 degrees (models/build_pipeline.py)
name = "ocr"
max_batch_size = 0

[[inputs]]
name = "image"
datatype = "UINT8"
dims = [1, -1, -1, 3]   # RGB; height and width multiples of 32

[[outputs]]
name = "direction"      # [1, 2]: probabilities of 0 and 180 degrees

[[outputs]]
name = "text_map"       # [1, 1, H, W]: the detector's text probability per pixel

[[pipeline.step]]
name = "pre"
model = "ocr_pre"
input_map = { image = "image" }
output_map = { det_input = "det_input", cls_image = "cls_image" }

[[pipeline.step]]
name = "detect"
model = "ocr_det"
input_map = { x = "det_input" }
output_map = { "sigmoid_0.tmp_0" = "text_map" }

[[pipeline.step]]
name = "crop"
model = "ocr_crop"
input_map = { image = "cls_image", prob = "text_map" }
output_map = { crop = "crop" }

[[pipeline.step]]
name = "classify"
model = "ocr_cls"
input_map = { x = "crop" }
output_map = { "save_infer_model/scale_0.tmp_1" = "direction" }
"""


def _finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version="1",
    )
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def pre_model() -> onnx.ModelProto:
    """``ocr_pre``: the detector's and the classifier's normalisation of one RGB image."""
    f32 = np.float32
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "c255"], ["unit"]),
        helper.make_node("Sub", ["unit", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["det_input"]),
        helper.make_node("Sub", ["unit", "half"], ["shifted"]),
        helper.make_node("Div", ["shifted", "half"], ["cls_image"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ocr_pre",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])],
        [
            helper.make_tensor_value_info("det_input", TensorProto.FLOAT, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info("cls_image", TensorProto.FLOAT, ["N", 3, "H", "W"]),
        ],
        initializer=[
            _const("c255", np.array(255.0, f32)),
            _const("mean", np.array(DET_MEAN, f32).reshape(1, 3, 1, 1)),
            _const("std", np.array(DET_STD, f32).reshape(1, 3, 1, 1)),
            _const("half", np.array(0.5, f32)),
        ],
    )
    return _finish(graph, "PP-OCR pre-processing: RGB uint8 NHWC -> detector and classifier inputs")


def crop_model() -> onnx.ModelProto:
    """``ocr_crop``: the box around the detected text, resized to the classifier's input."""
    i64 = np.int64
    nodes = [
        helper.make_node("Greater", ["prob", "threshold"], ["is_text"]),
        helper.make_node("Cast", ["is_text"], ["mask"], to=TensorProto.FLOAT),
        # rows [H] and columns [W] holding any text
        helper.make_node("ReduceMax", ["mask"], ["rows"], axes=[0, 1, 3], keepdims=0),
        helper.make_node("ReduceMax", ["mask"], ["cols"], axes=[0, 1, 2], keepdims=0),
        helper.make_node("Shape", ["rows"], ["height"]),
        helper.make_node("Shape", ["cols"], ["width"]),
        # first row with text, and one past the last (reversed: the first from the end);
        # without text ArgMax is 0 at both ends: the whole image
        helper.make_node("ArgMax", ["rows"], ["top"], axis=0, keepdims=1),
        helper.make_node("ArgMax", ["cols"], ["left"], axis=0, keepdims=1),
        helper.make_node("Slice", ["rows", "minus1", "int_min", "axis0", "minus1"], ["rows_r"]),
        helper.make_node("Slice", ["cols", "minus1", "int_min", "axis0", "minus1"], ["cols_r"]),
        helper.make_node("ArgMax", ["rows_r"], ["bottom_gap"], axis=0, keepdims=1),
        helper.make_node("ArgMax", ["cols_r"], ["right_gap"], axis=0, keepdims=1),
        helper.make_node("Sub", ["height", "bottom_gap"], ["bottom"]),
        helper.make_node("Sub", ["width", "right_gap"], ["right"]),
        helper.make_node("Concat", ["top", "left"], ["starts"], axis=0),
        helper.make_node("Concat", ["bottom", "right"], ["ends"], axis=0),
        helper.make_node("Slice", ["image", "starts", "ends", "axes23"], ["box"]),
        helper.make_node(
            "Resize",
            ["box", "", "", "size"],
            ["crop"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "ocr_crop",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"]),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1, "H", "W"]),
        ],
        [helper.make_tensor_value_info("crop", TensorProto.FLOAT, [1, 3, *CLS_SIZE])],
        initializer=[
            _const("threshold", np.array(TEXT_THRESHOLD, np.float32)),
            _const("minus1", np.array([-1], i64)),
            _const("int_min", np.array([np.iinfo(i64).min], i64)),
            _const("axis0", np.array([0], i64)),
            _const("axes23", np.array([2, 3], i64)),
            _const("size", np.array([1, 3, *CLS_SIZE], i64)),
        ],
    )
    return _finish(graph, "PP-OCR crop: the text's bounding box resized to the classifier input")


def pre_reference(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What ``ocr_pre`` computes, in numpy."""
    unit = image.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.array(DET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(DET_STD, np.float32).reshape(1, 3, 1, 1)
    return (unit - mean) / std, (unit - np.float32(0.5)) / np.float32(0.5)


def crop_box(prob: np.ndarray) -> tuple[int, int, int, int]:
    """The (top, left, bottom, right) box ``ocr_crop`` cuts, in numpy."""
    mask = prob[0, 0] > TEXT_THRESHOLD
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return 0, 0, mask.shape[0], mask.shape[1]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _check(pre: onnx.ModelProto, crop: onnx.ModelProto) -> None:
    """Both helpers against their numpy references (exits on a mismatch)."""
    rng = np.random.default_rng(20261205)
    image = rng.integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    run = ort.InferenceSession(pre.SerializeToString(), providers=["CPUExecutionProvider"])
    det, cls = run.run(None, {"image": image})
    want_det, want_cls = pre_reference(image)
    np.testing.assert_allclose(det, want_det, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cls, want_cls, rtol=1e-5, atol=1e-6)
    run = ort.InferenceSession(crop.SerializeToString(), providers=["CPUExecutionProvider"])
    prob = np.zeros((1, 1, 64, 96), np.float32)
    prob[0, 0, 10:20, 30:70] = 0.9
    for p in (prob, np.zeros_like(prob)):
        (out,) = run.run(None, {"image": cls, "prob": p})
        top, left, bottom, right = crop_box(p)
        box = cls[:, :, top:bottom, left:right]
        want = ort.InferenceSession(
            _resize_only().SerializeToString(), providers=["CPUExecutionProvider"]
        ).run(None, {"box": box})[0]
        assert out.shape == (1, 3, *CLS_SIZE), out.shape
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def _resize_only() -> onnx.ModelProto:
    """The crop model's resize alone (the reference crops in numpy, then resizes here)."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "Resize",
                ["box", "", "", "size"],
                ["out"],
                mode="linear",
                coordinate_transformation_mode="half_pixel",
            )
        ],
        "resize",
        [helper.make_tensor_value_info("box", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, *CLS_SIZE])],
        initializer=[_const("size", np.array([1, 3, *CLS_SIZE], np.int64))],
    )
    return _finish(graph, "resize reference")


def write_repository(repo: Path, det: Path, cls: Path) -> dict[str, str]:
    """Write the four step models and the pipeline into ``repo``; return {file: sha256}."""
    pre, crop = pre_model(), crop_model()
    _check(pre, crop)
    written = {}
    for name, data in (
        ("ocr_pre", pre.SerializeToString()),
        ("ocr_crop", crop.SerializeToString()),
        ("ocr_det", det.read_bytes()),
        ("ocr_cls", cls.read_bytes()),
    ):
        folder = repo / name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(data)
        written[f"{name}/1/model.onnx"] = hashlib.sha256(data).hexdigest()
    (repo / "ocr").mkdir(parents=True, exist_ok=True)
    (repo / "ocr" / "model.toml").write_text(OCR_PIPELINE_TOML)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the model repository to write")
    parser.add_argument("--det", type=Path, required=True, help="ch_PP-OCRv4_det_infer.onnx")
    parser.add_argument(
        "--cls", type=Path, required=True, help="ch_ppocr_mobile_v2.0_cls_infer.onnx"
    )
    args = parser.parse_args(argv)
    for path in (args.det, args.cls):
        if not path.is_file():
            parser.error(f"{path} is not a file")
    for file, digest in write_repository(args.out, args.det, args.cls).items():
        sys.stdout.write(f"{file}  sha256 {digest}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
