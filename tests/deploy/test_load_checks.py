"""The proof's own judgement (deploy/load.py): what counts as a correct answer, and its latency percentiles."""

from __future__ import annotations

import httpx

from deploy.load import SCORE_TOLERANCE, check_answer, make_jobs, percentile


def similarity_response(score: float, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json={"score": score, "similar": score >= 0.5, "threshold": 0.5})


def test_a_correct_score_passes_and_a_wrong_one_or_an_error_does_not() -> None:
    assert check_answer("/similarity", similarity_response(0.75), 0.75 + SCORE_TOLERANCE / 2) is None
    assert "direct call gave" in check_answer("/similarity", similarity_response(0.75), 0.70)
    assert check_answer("/similarity", similarity_response(0.75, status=503), 0.75).startswith("HTTP 503")


def test_an_explanation_needs_both_targets_and_every_overlay() -> None:
    image = {"overlay": "iVBORw0KGgo="}
    body = {"score": 0.3, "explanations": {
        "factual": {"target": "dissimilar", "image1": image, "image2": image},
        "counterfactual": {"target": "similar", "image1": image, "image2": image},
    }}
    assert check_answer("/explain", httpx.Response(200, json=body), 0.3) is None
    body["explanations"]["counterfactual"]["image2"] = {"overlay": ""}
    assert check_answer("/explain", httpx.Response(200, json=body), 0.3) == "an explanation overlay is empty"
    body["explanations"]["counterfactual"]["target"] = "dissimilar"
    assert "expected similar and dissimilar" in check_answer("/explain", httpx.Response(200, json=body), 0.3)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 1.0) == 3.0


def test_jobs_mix_both_endpoints_in_the_asked_numbers() -> None:
    jobs = make_jobs(similarity=30, explain=5, pair_count=4)
    assert sum(job.endpoint == "/similarity" for job in jobs) == 30
    assert sum(job.endpoint == "/explain" for job in jobs) == 5
    assert {job.pair_index for job in jobs} == {0, 1, 2, 3}
    assert jobs == make_jobs(similarity=30, explain=5, pair_count=4), "the order is reproducible"
