"""Candidate post-processing (mammoseg.evaluation.postprocess) on hand-built probability maps."""

from __future__ import annotations

import numpy as np
import pytest

from mammoseg.evaluation import froc
from mammoseg.evaluation.postprocess import kept_candidates, operating_mask, postprocess

THRESHOLD = 0.1  # level ceil(25.5) = 26


def blob_map() -> np.ndarray:
    """uint8 (20, 30) with four candidates at level 26, in raster order of their first pixel:

    0: rows 1-2, cols 1-3 (6 px), peak 200
    1: rows 1-3, cols 10-12 (9 px), peak 120, with a rim of 20 (below the level) around it
    2: rows 10-11, cols 1-2 (4 px), peak 200 (ties with candidate 0)
    3: one pixel at (15, 20), peak 250
    """
    prob = np.zeros((20, 30), dtype=np.uint8)
    prob[1:3, 1:4] = 60
    prob[2, 2] = 200
    prob[0:5, 9:14] = 20
    prob[1:4, 10:13] = 120
    prob[10:12, 1:3] = 200
    prob[15, 20] = 250
    return prob


def scores_and_areas(prob: np.ndarray):
    found = froc.image_candidates(prob, [], candidate_threshold=THRESHOLD, match="iou", iou_threshold=0.1)
    return [(c["score_u8"], c["area"]) for c in found.candidates]


def test_the_hand_built_map_has_the_candidates_described():
    assert scores_and_areas(blob_map()) == [(200, 6), (120, 9), (200, 4), (250, 1)]


def test_defaults_return_the_map_itself():
    prob = blob_map()
    assert postprocess(prob, candidate_threshold=THRESHOLD, min_area=0, top_k=0) is prob
    assert postprocess(prob, candidate_threshold=THRESHOLD, min_area=1, top_k=0) is prob


def test_min_area_keeps_a_candidate_of_exactly_min_area():
    out = postprocess(blob_map(), candidate_threshold=THRESHOLD, min_area=4, top_k=0)
    assert scores_and_areas(out) == [(200, 6), (120, 9), (200, 4)]  # the 1-pixel candidate went, the 4-pixel stayed
    assert out[15, 20] == 0
    out = postprocess(blob_map(), candidate_threshold=THRESHOLD, min_area=5, top_k=0)
    assert scores_and_areas(out) == [(200, 6), (120, 9)]


def test_removed_pixels_are_exactly_the_candidate_pixels():
    prob = blob_map()
    out = postprocess(prob, candidate_threshold=THRESHOLD, min_area=0, top_k=3)  # drops candidate 1 (lowest)
    expected = prob.copy()
    expected[1:4, 10:13] = 0  # the candidate ...
    np.testing.assert_array_equal(out, expected)  # ... while its rim of 20, below the level, stays
    assert prob[2, 11] == 120  # the input is not modified


def test_top_k_ties_go_to_the_first_candidate_in_raster_order():
    out = postprocess(blob_map(), candidate_threshold=THRESHOLD, min_area=0, top_k=2)
    assert scores_and_areas(out) == [(200, 6), (250, 1)]  # 250, then the earlier of the two 200s
    out = postprocess(blob_map(), candidate_threshold=THRESHOLD, min_area=0, top_k=1)
    assert scores_and_areas(out) == [(250, 1)]


def test_min_area_applies_before_top_k():
    out = postprocess(blob_map(), candidate_threshold=THRESHOLD, min_area=2, top_k=1)
    assert scores_and_areas(out) == [(200, 6)]  # the 250 single pixel is gone first; 200 beats 120, earlier 200 wins


def test_top_k_larger_than_the_count_keeps_everything():
    prob = blob_map()
    out = postprocess(prob, candidate_threshold=THRESHOLD, min_area=0, top_k=10)
    np.testing.assert_array_equal(out, prob)


def test_empty_map():
    prob = np.zeros((8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(postprocess(prob, candidate_threshold=THRESHOLD, min_area=5, top_k=1), prob)


def test_candidates_are_8_connected():
    prob = np.zeros((6, 6), dtype=np.uint8)
    prob[1, 1] = prob[2, 2] = prob[3, 3] = 100  # one diagonal candidate of 3 pixels
    np.testing.assert_array_equal(postprocess(prob, candidate_threshold=THRESHOLD, min_area=3, top_k=0), prob)
    assert not postprocess(prob, candidate_threshold=THRESHOLD, min_area=4, top_k=0).any()


def test_kept_candidates_directly():
    areas, scores = np.array([5, 1, 5, 9]), np.array([0.5, 0.9, 0.5, 0.1])
    assert kept_candidates(areas, scores, min_area=0, top_k=0).tolist() == [True, True, True, True]
    assert kept_candidates(areas, scores, min_area=5, top_k=0).tolist() == [True, False, True, True]
    assert kept_candidates(areas, scores, min_area=5, top_k=1).tolist() == [True, False, False, False]
    assert kept_candidates(np.array([], int), np.array([]), min_area=3, top_k=2).tolist() == []
    with pytest.raises(ValueError):
        kept_candidates(areas, scores, min_area=-1, top_k=0)


def test_a_zero_candidate_threshold_is_refused():
    with pytest.raises(ValueError, match="above probability 0"):
        postprocess(blob_map(), candidate_threshold=0.0, min_area=2, top_k=0)


def test_the_evaluate_stage_measures_the_post_processed_map(tmp_path):
    """The hand-built case of test_evaluate: with top_k = 1 only the best candidate of each image is left, so
    image A keeps its hit (A1) and loses its two false positives and the low-scoring candidate on A2."""
    import json

    from PIL import Image
    from test_evaluate import CONFIG, HIT, build_case

    from mammoseg.evaluation import evaluate

    manifest, lesions, probs, chunk = build_case(tmp_path)
    config = {**CONFIG, "evaluate": {**CONFIG["evaluate"], "postprocess": {"min_area": 0, "top_k": 1}}}
    out = tmp_path / "evaluated"
    evaluate.run_evaluate_chunk(chunk, manifest, out, chunk=0, config=config, image_set="test")
    a = json.loads((out / "P_1_LEFT_CC.json").read_text())
    assert (a["results"][0]["detected"], a["results"][0]["false_positives"]) == (1, 0)
    assert [c["score_u8"] for c in a["candidates"]] == [HIT]
    assert [les["hit"] for les in a["lesion_hits"]] == [True, False]
    mask = np.asarray(Image.open(out / "P_1_LEFT_CC.mask.png")) == 255
    np.testing.assert_array_equal(mask, probs["P_1_LEFT_CC"] == HIT)


# ----------------------------------------------------------------------------------------------------------
# the operating mask: pixel by pixel (the paper) or candidate by candidate (evaluate.binarise)
# ----------------------------------------------------------------------------------------------------------
def fragmenting_map():
    """uint8 (40, 60), levels: 0.1 -> 26, 0.9 -> 230.

    lesion: rows 5-24, cols 5-24 (400 px) at 60, with a 2 x 2 core of 240 at rows 14-15, cols 14-15;
    a false region: rows 5-7, cols 35-54 (60 px) at 100, with two single-pixel peaks of 240 at (6, 37), (6, 52);
    a low region: rows 30-34, cols 35-39 at 200 (0.78), under the operating threshold.
    """
    prob = np.zeros((40, 60), dtype=np.uint8)
    prob[5:25, 5:25] = 60
    prob[14:16, 14:16] = 240
    prob[5:8, 35:55] = 100
    prob[6, 37] = prob[6, 52] = 240
    prob[30:35, 35:40] = 200
    lesion = np.zeros(prob.shape, dtype=bool)
    lesion[5:25, 5:25] = True
    return prob, lesion


def test_operating_mask_by_threshold_is_the_pixels_at_or_above_it():
    prob, _ = fragmenting_map()
    mask = operating_mask(prob, 0.9, binarise="threshold", candidate_threshold=THRESHOLD)
    np.testing.assert_array_equal(mask, prob >= 230)
    assert mask.sum() == 4 + 2


def test_operating_mask_by_candidates_keeps_each_candidate_reaching_the_threshold_whole():
    prob, lesion = fragmenting_map()
    mask = operating_mask(prob, 0.9, binarise="candidates", candidate_threshold=THRESHOLD)
    expected = lesion.copy()
    expected[5:8, 35:55] = True  # the false region, whole; the low region (peak 200 < 230) is not a mark
    np.testing.assert_array_equal(mask, expected)
    # a threshold under the candidate level: the thresholded pixels are all in, candidates or not
    faint = np.zeros((5, 5), dtype=np.uint8)
    faint[2, 2] = 20  # 0.08: under the candidate level 26
    assert operating_mask(faint, 0.05, binarise="candidates", candidate_threshold=THRESHOLD)[2, 2]
    assert not operating_mask(np.zeros((4, 4), np.uint8), 0.5, binarise="candidates",
                              candidate_threshold=THRESHOLD).any()
    with pytest.raises(ValueError, match="unknown binarise"):
        operating_mask(prob, 0.9, binarise="hysteresis", candidate_threshold=THRESHOLD)


def test_binarising_by_candidates_puts_the_operating_point_on_the_froc():
    """By threshold the lesion's 4-px core (IoU 0.01) misses it and counts as a false positive, and the false
    region's two peaks count twice: 0 of 1 found, 3 false positives. By candidates: 1 of 1 and 1 false positive,
    which is what the FROC counts at that score."""
    from mammoseg.config.schema import validate_config
    from mammoseg.evaluation.evaluate import evaluate_arrays

    prob, lesion = fragmenting_map()
    results = {}
    for binarise in ("threshold", "candidates"):
        evaluate = validate_config({"evaluate": {"binarise": binarise}})["evaluate"]
        results[binarise] = evaluate_arrays(prob, [lesion], evaluate, threshold=0.9)
    by_threshold, by_candidates = results["threshold"]["results"][0], results["candidates"]["results"][0]
    assert (by_threshold["detected"], by_threshold["false_positives"]) == (0, 3)
    assert (by_candidates["detected"], by_candidates["false_positives"]) == (1, 1)
    assert by_candidates["pixel"]["tp"] == 400 and by_candidates["pixel"]["fp"] == 60
    candidates = results["candidates"]["candidates"]
    reaching = [c for c in candidates if c["score_u8"] >= 230]
    assert len(reaching) == 2 and sum(c["false_positive"] for c in reaching) == by_candidates["false_positives"]


def test_the_evaluate_stage_binarises_candidate_by_candidate(tmp_path):
    """The hand-built case of test_evaluate with a rim of 0.16 around the missed lesion A2 (0.39), at threshold
    0.35: pixel by pixel the mask holds A2's core, candidate by candidate A2 with its rim; the per-image JSON and
    the printed summary name the binarisation."""
    import json

    from PIL import Image
    from test_evaluate import CONFIG, _box, build_case

    from mammoseg.evaluation import evaluate, summary
    from mammoseg.inference import predict

    manifest, lesions, probs, chunk = build_case(tmp_path)
    faded = probs["P_1_LEFT_CC"].copy()
    faded[_box(40, 50, 50, 60)] = 0
    faded[_box(38, 48, 52, 62) & (faded == 0)] = 40  # a rim of 0.16 around A2: a candidate pixel
    faded[_box(40, 50, 50, 60)] = 100
    predict.save_prediction(faded, chunk / "P_1_LEFT_CC.prob.npz", {"mode": "paper"})
    for binarise in ("threshold", "candidates"):
        config = {**CONFIG, "infer": {**CONFIG["infer"], "threshold": 0.35},
                  "evaluate": {**CONFIG["evaluate"], "binarise": binarise}}
        out = tmp_path / binarise / "chunk-0"
        evaluate.run_evaluate_chunk(chunk, manifest, out, chunk=0, config=config, image_set="test")
        a = json.loads((out / "P_1_LEFT_CC.json").read_text())
        assert a["binarise"] == binarise
        mask = np.asarray(Image.open(out / "P_1_LEFT_CC.mask.png")) == 255
        expected = faded >= 90
        if binarise == "candidates":
            expected |= _box(38, 48, 52, 62)  # A2 with its rim, whole
        np.testing.assert_array_equal(mask, expected)
        text = summary.run_summarise([out], out.parent, experiment="toy", image_set="test", config=config)["text"]
        assert ("candidate by candidate" in text) == (binarise == "candidates")


def test_the_schema_offers_the_binarisations_the_code_knows():
    from mammoseg.config.schema import schema
    from mammoseg.evaluation.postprocess import BINARISE

    assert tuple(schema()["properties"]["evaluate"]["properties"]["binarise"]["enum"]) == BINARISE
