"""No non-numbers in tables (issue 33): proportions get intervals inside [0, 1], and a metric
that applies to no evaluated image reads "n/a" with its reason (``null`` in JSON)."""

import math

import pytest
import torch

from cdalign.alignment.report import metric_results
from cdalign.core.statistics import is_proportion, summarize_metric, wilson_interval
from cdalign.publishing.summaries import summary_table
from cdalign.runs.report import AlignmentReport, Estimate, MetricResult


@pytest.mark.parametrize("k, n, lo, hi", [
    (1, 2, 0.0945, 0.9055),    # the normal interval: 0.5 ± 0.98, outside [0, 1]
    (64, 64, 0.9434, 1.0),     # all correct: the normal interval collapses to [1, 1]
    (0, 5, 0.0, 0.4345),
    (81, 100, 0.7222, 0.8749),
])
def test_wilson_interval_against_hand_computed_values(k, n, lo, hi):
    # centre (p + z²/2n)/(1 + z²/n), half z·sqrt(p(1−p)/n + z²/4n²)/(1 + z²/n), z = 1.96
    z = 1.959964
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    got = wilson_interval(k, n)
    assert got == pytest.approx((max(0, centre - half), min(1, centre + half)))
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_a_proportion_gets_its_wilson_interval_and_other_values_the_normal_one():
    s = summarize_metric(torch.tensor([1.0, 0.0, float("nan")]))
    assert s["n"] == 2 and s["interval"] == "wilson" and 0 <= s["ci95"][0] <= s["ci95"][1] <= 1
    assert "interval" not in summarize_metric(torch.tensor([0.2, 0.7, 0.4]))
    assert is_proportion(torch.tensor([0.0, 1.0])) and not is_proportion(torch.tensor([0.0, 0.5]))


class _Scores:
    def __init__(self, metrics):
        self.metrics = metrics


def test_a_metric_that_applies_to_no_image_is_null_with_a_reason_and_reads_n_a():
    nan = torch.full((4,), float("nan"))
    hit = torch.tensor([1.0, 1.0, 0.0, 1.0])
    out = metric_results(_Scores({"background_accuracy": nan, "shape_accuracy": hit}),
                         _Scores({"background_accuracy": nan, "shape_accuracy": hit}))
    bg = out["background_accuracy"]
    assert bg.aligned.mean is None and bg.aligned.ci95 is None and bg.aligned.n == 0
    assert "applies to none of the 4 evaluated images" in bg.aligned.reason
    js = bg.to_json()["aligned"]
    assert js["mean"] is None and js["ci95"] is None and "reason" in js  # null in JSON, with why
    assert MetricResult.from_json(bg.to_json()).aligned.reason == bg.aligned.reason
    assert out["shape_accuracy"].aligned.interval == "wilson"
    assert out["shape_accuracy"].aligned.ci95[1] <= 1.0


def test_the_printed_table_says_n_a_and_names_the_interval_never_nan(tmp_path):
    import json
    from pathlib import Path

    shipped = sorted(Path(__file__).resolve().parents[1].glob("demo/loras/*/report.json"))
    report = AlignmentReport.from_json(json.loads(shipped[0].read_text()))
    none = Estimate(mean=None, ci95=None, n=0, reason="applies to none of the 4 evaluated images")
    wil = Estimate(mean=0.75, ci95=[0.30, 0.95], n=4, interval="wilson")
    report.metrics = {"background_accuracy": MetricResult(base=none, aligned=none, difference=none),
                      "shape_accuracy": MetricResult(base=wil, aligned=wil, difference=Estimate(mean=0.0, ci95=[0.0, 0.0]))}
    text = summary_table(report)
    assert "nan" not in text.lower()
    assert "background_accuracy: n/a, applies to none of the 4 evaluated images" in text
    assert "shape_accuracy: proportions of images, with Wilson score 95% intervals" in text
