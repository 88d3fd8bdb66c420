"""Detection F1 of a DBNet probability map (edged.optimize.detection): regions, DBNet's
box growth, one-to-one matching at IoU 0.5; and ``edged optimize`` gating a detector on it
(boxes.json, edged.optimize.data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edged.optimize import gate
from edged.optimize.data import BOXES_FILE, load_samples, split
from edged.optimize.detection import components, detect_boxes, evaluate, iou, match
from edged.optimize.errors import OptimizeError
from edged.optimize.methods import Options
from edged.optimize.run import Settings, optimize


def test_components_label_each_four_connected_region_once() -> None:
    mask = np.zeros((6, 8), bool)
    mask[0:2, 0:3] = True  # region one
    mask[3:6, 5] = True  # region two, a column
    mask[2, 4] = True  # only diagonal to region two: its own region
    mask[5, 0:3] = True
    mask[4, 2] = True  # joins the bottom row: one region
    labels = components(mask)
    assert (labels > 0).sum() == mask.sum()
    assert len(np.unique(labels[mask])) == 4
    assert len(np.unique(labels[0:2, 0:3])) == 1
    assert labels[4, 2] == labels[5, 0]
    assert labels[2, 4] != labels[3, 5]


def test_a_probability_blob_becomes_its_box_grown_by_dbnets_unclip_rule() -> None:
    prob = np.zeros((40, 60), np.float32)
    prob[10:20, 10:50] = 0.9  # 40 x 10: area 400, perimeter 100 -> grows 400 * 1.6 / 100
    prob[30:32, 50:52] = 0.9  # 2 x 2: under the minimum size
    prob[25:29, 10:30] = 0.4  # above thresh, mean under box_thresh
    boxes = detect_boxes(prob)
    assert boxes == [pytest.approx((10 - 6.4, 10 - 6.4, 50 + 6.4, 20 + 6.4))]


def test_matching_is_one_to_one_at_the_iou_threshold() -> None:
    known = [(0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 30.0, 10.0)]
    assert iou(known[0], known[0]) == 1.0
    assert iou(known[0], (5.0, 0.0, 15.0, 10.0)) == pytest.approx(1 / 3)
    # two boxes on the first: one match; a box at IoU 1/3 to the second: none
    assert match([(0.0, 0.0, 10.0, 10.0), (1.0, 0.0, 10.0, 10.0), (25.0, 0.0, 35.0, 10.0)],
                 known) == 1  # fmt: skip


def test_evaluate_counts_precision_recall_and_f1_over_pages() -> None:
    maps = np.zeros((2, 1, 40, 60), np.float32)
    maps[0, 0, 10:20, 10:50] = 0.9
    maps[1, 0, 10:20, 10:50] = 0.9
    grown = (10 - 6.4, 10 - 6.4, 50 + 6.4, 20 + 6.4)
    found = evaluate(maps, [[grown], [grown, (0.0, 30.0, 20.0, 38.0)]])
    assert (found.matched, found.found, found.known) == (2, 2, 3)
    assert found.precision == 1.0
    assert found.recall == pytest.approx(2 / 3)
    assert found.f1 == pytest.approx(0.8)
    with pytest.raises(ValueError, match="2 maps"):
        evaluate(maps, [[grown]])


# ``edged optimize`` gating a detector on its task: a detector-like ONNX model (a 3x3 Conv and a
# Sigmoid: bright shrunk text -> probability ~1), pages of small bright bars, and boxes.json

SIZE = 128
BAR = (4, 16)  # h, w: 2 bars a page are under 1 % of the pixels, so agreement alone passes


def detector(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.full((1, 1, 3, 3), 0.01, np.float32)
    weight[0, 0, 1, 1] = 10.0  # magnitude pruning at 95 % (9 of 9 weights) kills it
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["logit"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["logit"], ["maps"]),
        ],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array([-5.0], np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def pages(n: int, seed: int) -> tuple[np.ndarray, list[list[list[float]]]]:
    """``n`` pages with two bars each, and each bar's box grown by DBNet's unclip rule (the
    detector predicts text shrunk by it)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, SIZE, SIZE), np.float32)
    h, w = BAR
    grow = h * w * 1.6 / (2 * (h + w))
    boxes = []
    for i in range(n):
        page = []
        for top in (int(rng.integers(10, 50)), int(rng.integers(70, 110))):
            left = int(rng.integers(10, SIZE - w - 10))
            x[i, 0, top : top + h, left : left + w] = 1.0
            page.append([left - grow, top - grow, left + w + grow, top + h + grow])
        boxes.append(page)
    return x, boxes


def folder(path: Path, x: np.ndarray, boxes: object) -> Path:
    path.mkdir()
    np.save(path / "x.npy", x)
    (path / BOXES_FILE).write_text(json.dumps({"boxes": boxes}))
    return path


def test_optimize_gates_a_detector_on_detection_f1_not_pixel_agreement(tmp_path: Path) -> None:
    model = detector(tmp_path / "det.onnx")
    x, boxes = pages(16, seed=3)
    calib = folder(tmp_path / "calib", x[:8], boxes[:8])
    held = folder(tmp_path / "held", x[8:], boxes[8:])
    settings = Settings(
        methods=("int8-static-minmax", "prune-magnitude"),
        budget=gate.Budget(max_accuracy_drop=1.0),
        holdout=held,
        options=Options(sparsity=0.95),
        runs=2,
        plot=False,
        task="detection",
    )
    result = optimize(model, calib, tmp_path / "out", settings)
    base, quantised, destroyed = result.reports
    assert base.accuracy == 1.0
    assert base.notes["boxes"] == [16, 16, 16]
    assert quantised.accepted, quantised.reason
    assert quantised.accuracy == 1.0
    assert (tmp_path / "out/int8-static-minmax/det/1/model.onnx").is_file()
    # the pixels of the bars are under 1 % of the map: by agreement it would pass
    assert destroyed.agreement is not None
    assert destroyed.agreement > 0.99
    assert not destroyed.accepted
    assert destroyed.accuracy == 0.0
    assert destroyed.notes["f1"] == 0.0
    assert "detection F1 drop 100.00 points > 1" in destroyed.reason
    assert not (tmp_path / "out/prune-magnitude").exists()


def test_without_a_budget_a_detector_is_gated_on_f1_and_a_chosen_agreement_is_kept(
    tmp_path: Path,
) -> None:
    model = detector(tmp_path / "det.onnx")
    x, boxes = pages(16, seed=3)
    calib = folder(tmp_path / "calib", x[:8], boxes[:8])
    held = folder(tmp_path / "held", x[8:], boxes[8:])
    settings = Settings(
        methods=("prune-magnitude",),
        holdout=held,
        options=Options(sparsity=0.95),
        runs=2,
        plot=False,
    )
    assert settings.budget.default
    result = optimize(model, calib, tmp_path / "out", settings)
    _, destroyed = result.reports
    assert result.budget == gate.Budget(max_accuracy_drop=gate.DEFAULT_MAX_F1_DROP, default=True)
    assert result.lineage["budget"] == "accuracy drop <= 1 points"
    # over 99 % of the pixels agree: the old default (--min-agreement 0.99) let it through
    assert destroyed.agreement is not None
    assert destroyed.agreement > gate.DEFAULT_MIN_AGREEMENT
    assert not destroyed.accepted
    assert "detection F1 drop 100.00 points > 1" in destroyed.reason
    # a budget the user chose is kept, detector or not
    settings.budget = gate.Budget.of(None, 0.99)
    result = optimize(model, calib, tmp_path / "out2", settings)
    assert result.budget == gate.Budget(min_agreement=0.99)
    assert result.reports[1].accepted
    assert result.reports[1].reason.startswith("agreement")


def test_task_detection_needs_boxes(tmp_path: Path) -> None:
    model = detector(tmp_path / "det.onnx")
    x, _ = pages(4, seed=1)
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib/x.npy", x)
    settings = Settings(methods=("fp16",), plot=False, runs=1, task="detection")
    with pytest.raises(OptimizeError, match=r"--task detection: .*no boxes\.json"):
        optimize(model, tmp_path / "calib", tmp_path / "out", settings)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", r"boxes: missing"),
        ('{"boxes": [[], []], "page": 1}', r"page: unknown field"),
        ('{"boxes": [[]]}', r"boxes: 1 rows of boxes, the samples have 2 rows"),
        ('{"boxes": [[], 3]}', r"boxes\[1\]: a list of boxes"),
        ('{"boxes": [[], [[1, 2, 3]]]}', r"boxes\[1\]\[0\]: \[x0, y0, x1, y1\]"),
        ('{"boxes": [[[0, 0, 5, 5], [1, "a", 4, 4]], []]}', r"boxes\[0\]\[1\]: y0: a finite"),
        ('{"boxes": [[], [[5, 0, 2, 4]]]}', r"boxes\[1\]\[0\]: x1 \(2\) must be greater than x0"),
        ('{"boxes": [[], [[0, 4, 2, 4]]]}', r"boxes\[1\]\[0\]: y1 \(4\) must be greater than y0"),
        ("{not json", r"not readable JSON"),
    ],
)
def test_a_bad_boxes_file_names_the_field(tmp_path: Path, content: str, match: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    (tmp_path / BOXES_FILE).write_text(content)
    with pytest.raises(OptimizeError, match=match):
        load_samples(tmp_path, ["x"], "--holdout")


def test_boxes_travel_with_their_rows_through_the_split(tmp_path: Path) -> None:
    x, boxes = pages(6, seed=2)
    samples = load_samples(folder(tmp_path / "all", x, boxes), ["x"])
    assert samples.boxes is not None
    assert len(samples.boxes) == 6
    calib, held = split(samples, 0.5)
    for part in (calib, held):
        assert part.boxes is not None
        for row, page in zip(part.inputs["x"], part.boxes, strict=True):
            i = next(k for k in range(6) if np.array_equal(x[k], row))
            assert page == tuple(tuple(b) for b in boxes[i])
    np.save(tmp_path / "all/labels.npy", np.zeros(6, np.int64))
    with pytest.raises(OptimizeError, match=r"both labels and boxes\.json"):
        load_samples(tmp_path / "all", ["x"])


def test_boxes_for_a_model_without_a_probability_map_are_named(tmp_path: Path) -> None:
    from tests.daemon_process import EXAMPLE_MODELS

    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "input.npy", np.zeros((4, 64), np.float32))
    (calib / BOXES_FILE).write_text(json.dumps({"boxes": [[], [], [], [[0, 0, 4, 4]]]}))
    settings = Settings(methods=("fp16",), plot=False, runs=1, holdout_share=0.5)
    with pytest.raises(OptimizeError, match=r"output 'probabilities' has shape \[2, 10\], not a"):
        optimize(EXAMPLE_MODELS / "digits", calib, tmp_path / "out", settings)
