"""OKS sigmas of the keypoint evaluation: the data set's category, or --kpt-sigmas."""

from __future__ import annotations

import math

import pytest

from cnnkit.train.detect_eval import coco_metrics, keypoint_sigmas

AREA = 100.0
SHIFT = 3.0  # every predicted keypoint is this many pixels right of its ground truth


def ground_truth(sigmas: list[float] | None) -> dict:
    category = {"id": 1, "name": "thing", "keypoints": ["a", "b"], "skeleton": [[1, 2]]}
    if sigmas is not None:
        category["keypoint_sigmas"] = sigmas
    return {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [category],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [5.0, 5.0, 30.0, 30.0],
                "area": AREA,
                "iscrowd": 0,
                "keypoints": [10, 10, 2, 20, 20, 2],
                "num_keypoints": 2,
            }
        ],
    }


RESULT = [
    {
        "image_id": 1,
        "category_id": 1,
        "bbox": [5.0, 5.0, 30.0, 30.0],
        "score": 0.9,
        "keypoints": [10 + SHIFT, 10, 1, 20 + SHIFT, 20, 1],
    }
]


def oks(sigma: float) -> float:
    """COCO's OKS of RESULT: exp(-d^2 / (2 s^2 (2 sigma)^2)) for both keypoints, s^2 = area."""
    return math.exp(-(SHIFT**2) / (2 * AREA * (2 * sigma) ** 2))


def expected_ap(sigma: float) -> float:
    """AP@[.5:.95] of one ground truth and one detection: the share of thresholds <= OKS."""
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    return sum(oks(sigma) >= t for t in thresholds) / 10


@pytest.mark.parametrize("sigma", [0.3, 0.15, 0.1])
def test_the_categorys_keypoint_sigmas_decide_the_oks(sigma):
    metrics = coco_metrics(ground_truth([sigma, sigma]), RESULT, ("keypoints",))
    assert metrics["keypoint_ap"] == pytest.approx(expected_ap(sigma), abs=1e-9)
    assert metrics["keypoint_ap50"] == pytest.approx(1.0 if oks(sigma) >= 0.5 else 0.0, abs=1e-9)


def test_kpt_sigmas_override_the_data_set():
    gt = ground_truth([0.3, 0.3])  # alone: OKS 0.88, AP 0.8
    assert expected_ap(0.3) == pytest.approx(0.8)
    metrics = coco_metrics(gt, RESULT, ("keypoints",), kpt_sigmas=[0.05, 0.05])
    assert oks(0.05) < 0.5 and metrics["keypoint_ap"] == metrics["keypoint_ap50"] == 0.0
    assert keypoint_sigmas(gt) == [0.3, 0.3]
    assert keypoint_sigmas(gt, [0.1, 0.2]) == [0.1, 0.2]


def test_without_sigmas_a_non_coco_skeleton_is_an_error():
    gt = ground_truth(None)
    assert keypoint_sigmas(gt) is None
    with pytest.raises(ValueError, match="sigma"):
        coco_metrics(gt, RESULT, ("keypoints",))
