"""The operating threshold calibrated for a target FPPI (mammoseg.evaluation.calibrate), on hand-computed curves."""

from __future__ import annotations

import math

import pytest

from mammoseg.config.schema import validate_config
from mammoseg.evaluation.calibrate import calibrate_threshold, operating_threshold

# Two images, four lesions. By hand, for each threshold t (candidates with score >= t count):
#   t      0.3  0.4  0.5  0.8  0.9  0.95  inf
#   FP      5    4    4    3    1    0     0      -> FPPI 2.5 2.0 2.0 1.5 0.5 0.0 0.0
#   hits    3    3    2    2    1    1     0      -> TPR  .75 .75 .50 .50 .25 .25 0
FP = [0.9, 0.8, 0.8, 0.5, 0.3]
HITS = [0.95, 0.8, 0.4, 0.0]  # the last lesion is missed


def calibrated(target):
    return calibrate_threshold(FP, HITS, n_lesions=4, n_images=2, target_fppi=target)


@pytest.mark.parametrize("target, threshold, tpr, fppi", [
    (10.0, 0.3, 0.75, 2.5),   # every candidate is admissible: the lowest score
    (2.5, 0.3, 0.75, 2.5),    # exactly the target is admissible
    (2.0, 0.4, 0.75, 2.0),    # the lowest of the two thresholds at FPPI 2
    (1.9, 0.8, 0.50, 1.5),
    (1.0, 0.9, 0.25, 0.5),    # the two false positives at 0.8 come in together: FPPI jumps 0.5 -> 1.5
    (0.5, 0.9, 0.25, 0.5),
    (0.0, 0.95, 0.25, 0.0),
])
def test_lowest_threshold_within_the_target(target, threshold, tpr, fppi):
    result = calibrated(target)
    assert result["threshold"] == threshold
    assert result["expected_tpr"] == pytest.approx(tpr) and result["expected_fppi"] == pytest.approx(fppi)
    assert result["expected_fppi"] <= target


def test_counts_and_provenance():
    result = calibrated(1.9)
    assert (result["detected"], result["false_positives"]) == (2, 3)
    assert (result["target_fppi"], result["n_lesions"], result["n_images"]) == (1.9, 4, 2)


def test_top_score_already_over_the_target_admits_nothing():
    # two false positives at probability 1.0 on one image: FPPI 2 at every candidate score
    result = calibrate_threshold([1.0, 1.0], [0.5], n_lesions=1, n_images=1, target_fppi=1.0)
    assert math.isinf(result["threshold"])
    assert (result["expected_tpr"], result["expected_fppi"], result["detected"]) == (0.0, 0.0, 0)


def test_no_lesions_gives_nan_tpr_and_a_threshold_from_false_positives_alone():
    result = calibrate_threshold([0.2, 0.6], [], n_lesions=0, n_images=4, target_fppi=0.25)
    assert result["threshold"] == 0.6 and result["expected_fppi"] == 0.25 and math.isnan(result["expected_tpr"])


def test_bad_target_is_refused():
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="target_fppi"):
            calibrated(bad)


def test_operating_threshold_defaults_to_the_configured_one():
    config = validate_config({"infer": {"threshold": 0.4}})
    assert config["evaluate"]["target_fppi"] == 0
    chosen = operating_threshold(config["infer"], config["evaluate"], FP, HITS, 4, 2)
    assert chosen == {"threshold": 0.4, "source": "infer.threshold"}


def test_operating_threshold_calibrated_and_unreachable():
    config = validate_config({"evaluate": {"target_fppi": 1.0}})
    chosen = operating_threshold(config["infer"], config["evaluate"], FP, HITS, 4, 2)
    assert chosen["threshold"] == 0.9 and chosen["source"] == "calibrated"
    assert chosen["calibration"]["expected_fppi"] == 0.5
    with pytest.raises(ValueError, match="target_fppi = 1.0"):
        operating_threshold(config["infer"], config["evaluate"], [1.0, 1.0], [0.5], 1, 1)


def test_a_candidate_score_as_pixel_threshold_keeps_exactly_that_candidate_level():
    from mammoseg.evaluation.metrics import threshold_level

    assert all(threshold_level(k / 255) == k for k in range(1, 256))  # score k/255 -> pixels >= k
