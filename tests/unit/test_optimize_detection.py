"""Detection F1 of a DBNet probability map (edged.optimize.detection): regions, DBNet's
box growth, one-to-one matching at IoU 0.5."""

from __future__ import annotations

import numpy as np
import pytest

from edged.optimize.detection import components, detect_boxes, evaluate, iou, match


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
