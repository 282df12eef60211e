"""The typed run report (cdalign.runs.report): one JSON form that reads back to the same
report, reports of earlier cdalign versions read, anything else refused with a way out,
and one set of unit strings for a constraint entry."""

import json
from pathlib import Path

import pytest

from cdalign.core.problem import Constraint
from cdalign.runs.report import (
    AlignmentReport,
    ConstraintResult,
    Estimate,
    EstimatorSummary,
    KLResult,
    MetricResult,
    ObjectiveResult,
    ReportFormatError,
    RewardResult,
    RewardSummary,
    constraint_units,
)

SHIPPED = Path(__file__).resolve().parents[1] / "demo" / "loras"


def report_of_this_version() -> AlignmentReport:
    constraint = ConstraintResult(
        name="saturation_high", source="saturation", direction="high", threshold=0.5, normalized=True,
        units="base std", n=8, measured=0.9, ci95=[0.6, 1.2], base_measured=0.0, base_ci95=[-0.3, 0.3],
        base_slack=0.5, difference=Estimate(mean=0.9, ci95=[0.8, 1.0], n=8), slack=-0.4, satisfied=True,
        ci_clears_threshold=True, met="CI", target=0.6, target_from={"margin": 0.1, "from": "fixed margin"}, dual=0.125,
    )
    reward = RewardResult(base=RewardSummary(mean=0.2, ci95=[0.1, 0.3], normalized_mean=0.0, normalized_ci95=[-0.5, 0.5]),
                          aligned=RewardSummary(mean=0.4, ci95=[0.3, 0.5], normalized_mean=0.9, normalized_ci95=[0.6, 1.2]),
                          difference=Estimate(mean=0.9, ci95=[0.8, 1.0], n=8, units="base std"))
    metric = MetricResult(base=Estimate(mean=1.0, ci95=[1.0, 1.0], n=8), aligned=Estimate(mean=0.9, ci95=[0.8, 1.0], n=8),
                          difference=Estimate(mean=-0.1, ci95=[-0.2, 0.0], n=8))
    return AlignmentReport(
        model="cdalign/tiny-random-sd", pipeline_class="StableDiffusionPipeline", pipeline_absent_components=[],
        sampler={"num_inference_steps": 4}, steps=2, num_eval_images=8,
        eval={"seed": 1, "images": 8, "prompts": 2, "paired": True},
        rewards={"saturation": reward}, metrics={"color_accuracy": metric},
        kl=KLResult(estimator="path", units="nats", mean=0.05, ci95=[0.03, 0.07], n=8),
        constraints=[constraint], objective=ObjectiveResult(type="kl", value=0.05),
        estimator=EstimatorSummary(name="reward_backprop", settings={"backprop_steps": 1}),
        all_satisfied=True, infeasible=[], normalization={"saturation": {"mean": 0.2, "std": 0.1, "count": 4}},
        sources={"model": None, "prompts": None, "eval_prompts": None}, eval_values="eval_values.safetensors",
        reward_sources={"saturation": "user callable f (not recordable)"},
    )


def test_a_report_reads_back_from_its_json_form_unchanged(tmp_path):
    report = report_of_this_version()
    assert AlignmentReport.from_json(report.to_json()) == report
    report.write(tmp_path / "report.json")
    assert AlignmentReport.read(tmp_path / "report.json") == report
    assert json.loads((tmp_path / "report.json").read_text()) == report.to_json()


def test_the_json_form_has_report_json_keys_in_their_order():
    data = report_of_this_version().to_json()
    assert list(data) == ["model", "pipeline_class", "pipeline_absent_components", "sampler", "steps", "num_eval_images",
                          "eval", "rewards", "metrics", "kl", "constraints", "objective", "estimator", "all_satisfied",
                          "infeasible", "normalization", "sources", "eval_values", "reward_sources"]
    assert list(data["constraints"][0]) == [
        "name", "source", "direction", "threshold", "normalized", "units", "n", "measured", "ci95", "base_measured",
        "base_ci95", "base_slack", "difference", "slack", "satisfied", "ci_clears_threshold", "met", "target",
        "target_from", "dual", "flagged_infeasible_at_step"]
    assert data["constraints"][0]["flagged_infeasible_at_step"] is None  # never flagged: written as null
    assert list(data["kl"]) == ["estimator", "units", "mean", "ci95", "n"]
    assert data["objective"] == {"type": "kl", "value": 0.05}


def test_a_report_is_read_by_attribute_and_still_by_key():
    report = report_of_this_version()
    assert report.constraints[0].dual == report["constraints"][0]["dual"] == 0.125
    assert report.kl.mean == report["kl"]["mean"] and report.get("sample_grid") is None and "sample_grid" not in report
    assert report.rewards["saturation"].normalized


@pytest.mark.parametrize("name", ["bright", "muted", "colorful"])
def test_a_shipped_report_of_an_earlier_version_reads_and_writes_back_whole(name):
    """The demo's reports predate pipeline_class, sampler, estimator, met and target."""
    data = json.loads((SHIPPED / name / "report.json").read_text())
    report = AlignmentReport.from_json(data)
    assert report.pipeline_class is None and report.estimator is None and report.constraints[0].met is None
    assert report.constraints[0].dual == data["constraints"][0]["dual"]
    assert report.to_json() == data


def test_the_first_report_form_reads():
    """cdalign's first report: no units, no counts, no base CI, no paired differences."""
    first = {
        "model": "m", "steps": 2, "num_eval_images": 4,
        "rewards": {"saturation": {"base": {"mean": 0.1, "ci95": [0.0, 0.2]}, "aligned": {"mean": 0.3, "ci95": [0.2, 0.4]}}},
        "kl": {"estimator": "path", "mean": 0.01, "ci95": [0.0, 0.02]},
        "constraints": [{"name": "s", "source": "saturation", "direction": "high", "threshold": 0.2, "normalized": False,
                         "measured": 0.3, "ci95": [0.2, 0.4], "base_measured": 0.1, "slack": -0.1, "satisfied": True,
                         "ci_clears_threshold": True, "dual": 0.0, "flagged_infeasible_at_step": None}],
        "objective": {"type": "kl", "value": 0.01}, "all_satisfied": True, "infeasible": [], "normalization": {},
    }
    report = AlignmentReport.from_json(first)
    assert report.constraints[0].units is None and report.constraints[0].difference is None
    assert report.rewards["saturation"].difference is None and not report.rewards["saturation"].normalized
    assert report.to_json() == first


def test_keys_this_version_does_not_know_are_kept():
    data = {**report_of_this_version().to_json(), "from_a_newer_cdalign": {"x": 1}}
    assert AlignmentReport.from_json(data).to_json() == data


@pytest.mark.parametrize("data, named", [
    ([1, 2], "not a JSON object"),
    ({"constraints": [{"name": "s", "source": "saturation", "direction": "high", "threshold": 0.2}]},
     r"constraints\[0\] lacks 'measured', 'ci95'"),
    ({"constraints": {"s": {}}}, "constraints is not a list"),
    ({"kl": {"mean": 0.1, "ci95": [0, 1]}}, "kl lacks 'estimator'"),
    ({"rewards": {"saturation": {"base": {"mean": 0.1}}}}, r"rewards\['saturation'\] lacks 'aligned'"),
])
def test_what_is_not_a_report_is_refused_saying_how_to_regenerate_it(data, named):
    with pytest.raises(ReportFormatError, match=named) as err:
        AlignmentReport.from_json(data)
    assert "rerun the training from the run's config.yaml" in str(err.value)


def test_a_file_that_is_not_json_is_refused_naming_it(tmp_path):
    (tmp_path / "report.json").write_text("{half")
    with pytest.raises(ReportFormatError, match=r"report.json' is not JSON.*regenerate it"):
        AlignmentReport.read(tmp_path / "report.json")


def test_a_constraint_entry_has_one_set_of_units():
    assert constraint_units(True, False, "path") == "kl nats (path)"
    assert constraint_units(False, True, "path") == "base std"
    assert constraint_units(False, False, "uniform") == "raw"


def test_a_harness_entry_leaves_out_what_it_does_not_measure():
    verdict = {"measured": 0.4, "ci95": [0.3, 0.5], "slack": -0.1, "satisfied": True, "ci_clears_threshold": False}
    entry = ConstraintResult.from_verdict(Constraint("s", "saturation", "low", 0.5), verdict, "raw", dual=None).to_json()
    assert entry == {"name": "s", "source": "saturation", "direction": "low", "threshold": 0.5, "normalized": False,
                     "units": "raw", **verdict, "dual": None, "flagged_infeasible_at_step": None}
