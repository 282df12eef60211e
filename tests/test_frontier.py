"""The frontier comparison (cdalign.evaluation.frontier) against hand-computed cases."""

import shutil

import pytest
import torch

from cdalign.evaluation import frontier as fr
from cdalign.evaluation.frontier import (
    RunPoint, Setting, cheapest_feasible, compare_setting, feasible, kl_verdict, overshoot, runs_to_first_feasible,
)
from cdalign.publishing.summaries import frontier_table


def point(name, c, b, kl, weights=None, spread=0.0):
    n = 8
    noise = torch.linspace(-spread, spread, n, dtype=torch.float64)
    return RunPoint(name, {"c": torch.full((n,), c, dtype=torch.float64) + noise,
                           "b": torch.full((n,), b, dtype=torch.float64) + noise},
                    torch.full((n,), kl, dtype=torch.float64) + noise.abs() / 10, weights=weights)


SETTING = Setting("s", {"c": ("high", 0.75), "b": ("high", 0.35)})


def test_overshoot_is_the_distance_past_the_threshold_on_the_allowed_side():
    assert overshoot(0.5, 0.35, "high") == pytest.approx(0.15)
    assert overshoot(0.2, 0.35, "high") == pytest.approx(-0.15)
    assert overshoot(-0.4, -0.25, "low") == pytest.approx(0.15)


def test_feasible_needs_every_mean_past_its_threshold_and_ci_needs_the_whole_interval():
    assert feasible(point("a", 1.0, 0.4, 0.1), SETTING)
    assert not feasible(point("a", 1.0, 0.3, 0.1), SETTING)
    wide = point("w", 1.0, 0.4, 0.1, spread=0.5)
    assert feasible(wide, SETTING, "mean") and not feasible(wide, SETTING, "ci")


def test_cheapest_feasible_is_the_smallest_kl_among_feasible_runs_only():
    runs = [point("miss", 0.5, 0.1, 0.01), point("dear", 2.0, 0.5, 0.3), point("cheap", 1.0, 0.4, 0.12)]
    assert cheapest_feasible(runs, SETTING).name == "cheap"
    assert cheapest_feasible(runs[:1], SETTING) is None


def test_runs_to_first_feasible_counts_the_sweep_in_its_order():
    sweep = [point("0.1", 0.3, 0.0, 0.01), point("0.5", 0.9, 0.2, 0.05), point("1.5", 2.0, 0.5, 0.2)]
    assert runs_to_first_feasible(sweep, SETTING) == 3
    assert runs_to_first_feasible(sweep[:2], SETTING) is None


def test_kl_verdict_reads_the_paired_ci():
    assert kl_verdict({"ci95": [-0.05, -0.01]}) == "cheaper"
    assert kl_verdict({"ci95": [-0.05, 0.01]}) == "tie"
    assert kl_verdict({"ci95": [0.01, 0.05]}) == "dearer"


def test_compare_setting_pairs_the_kl_with_the_cheapest_feasible_fixed_run():
    fixed = [point("f0.5", 2.1, 0.39, 0.125, {"c": 0.5, "b": 0.5}), point("f0.15", 0.9, 0.2, 0.04, {"c": 0.15, "b": 0.15})]
    constrained = point("con", 0.95, 0.45, 0.09)
    row = compare_setting(constrained, fixed, fixed[::-1], SETTING)
    best = row["cheapest_feasible_mean"]
    assert best["run"] == "f0.5"
    assert best["kl_difference"]["mean"] == pytest.approx(0.09 - 0.125)
    assert best["kl_difference"]["verdict"] == "cheaper"
    assert row["constrained"]["constraints"]["b"]["overshoot"] == pytest.approx(0.10)
    assert row["sweep_runs_to_first_feasible"] == 2 and row["claim_holds"]
    assert "cheapest feasible weight, λ = (0.5, 0.5)" in frontier_table([row], 8)


def test_the_claim_fails_when_the_constrained_run_misses_or_pays_more():
    fixed = [point("f", 1.0, 0.4, 0.05, {"c": 0.2, "b": 0.2})]
    assert not compare_setting(point("con", 1.0, 0.3, 0.04), fixed, fixed, SETTING)["claim_holds"]
    assert not compare_setting(point("con", 1.0, 0.4, 0.09), fixed, fixed, SETTING)["claim_holds"]


def test_weighted_runs_freeze_lambda_and_constrained_runs_ask_for_confidence(tmp_path):
    runs, constrained_of = fr.grid(quick=False)
    assert len([n for n in runs if "weights" in runs[n]]) >= 7 and len(constrained_of) >= 3
    fixed = fr.resolved_config("fixed_0.5_0.5", runs["fixed_0.5_0.5"], tmp_path, {}, 64)
    assert fixed.dual.freeze and fixed.dual.init == [0.5, 0.5]
    assert all(c.confidence is None for c in fixed.constraints)
    con = fr.resolved_config("constrained_uneven", runs["constrained_uneven"], tmp_path, {}, 64)
    assert not con.dual.freeze and [c.threshold for c in con.constraints] == list(fr.SETTINGS["uneven"])
    assert all(c.confidence == fr.CONFIDENCE for c in con.constraints)
    assert fixed.learning_rate == con.learning_rate and fixed.max_steps == con.max_steps  # the same recipe


def test_a_run_is_reused_only_when_finished_with_the_same_config(tmp_path):
    import json

    from cdalign.alignment.config import save_config
    from cdalign.evaluation.scoring import EVAL_VALUES_FILE, save_eval_values

    runs, _ = fr.grid(quick=True)
    cfg = fr.resolved_config("fixed_0.5_0.5", runs["fixed_0.5_0.5"], tmp_path, {"max_steps": 2}, 2)
    run = tmp_path / "runs" / "fixed_0.5_0.5"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    assert not fr.is_reusable(cfg)  # unfinished: no report, no per-image values
    (run / "report.json").write_text(json.dumps({"constraints": []}))
    save_eval_values(run / EVAL_VALUES_FILE, {"kl": torch.zeros(8)})
    assert fr.is_reusable(cfg)
    other = fr.resolved_config("fixed_0.5_0.5", runs["fixed_0.5_0.5"], tmp_path, {"max_steps": 3}, 2)
    assert not fr.is_reusable(other)  # a changed config is retrained, never picked up
    # the same finished run copied into another frontier folder is the same run
    copy = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "runs", copy / "runs")
    assert fr.is_reusable(fr.resolved_config("fixed_0.5_0.5", runs["fixed_0.5_0.5"], copy, {"max_steps": 2}, 2))


def test_quick_frontier_trains_through_the_recipe_and_writes_its_table_and_figures(tmp_path):
    import json

    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "frontier.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run():
        return subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], env=env, capture_output=True,
                              text=True, timeout=1800)

    out = tmp_path / "fq"
    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "frontier.json").read_text())
    assert result["quick"] and len(result["settings"]) == 1
    row = result["settings"][0]
    assert row["fixed_runs"] == 2 and row["constrained"]["run"] == "constrained_default"
    assert set(result["runs"]) == {"fixed_0.5_0.5", "fixed_1.5_1.5", "constrained_default"}
    for name in ("frontier.md", "frontier_plane.png", "frontier_kl.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "runs" / "constrained_default" / "report.json").read_text())
    assert report["constraints"][0]["target"] > report["constraints"][0]["threshold"]
    # a second invocation reuses every finished run
    again = run()
    assert again.returncode == 0 and again.stdout.count(": reusing ") == 3, again.stdout[-3000:]


def test_the_cheapest_feasible_equal_weight_is_found_in_the_sweep_alone():
    equal = [point("e0.15", 1.8, 0.34, 0.04, {"c": 0.15, "b": 0.15}), point("e0.5", 2.1, 0.4, 0.13, {"c": 0.5, "b": 0.5})]
    unequal = [point("u", 0.97, 0.55, 0.03, {"c": 0.05, "b": 0.5})]
    row = compare_setting(point("con", 1.17, 0.48, 0.055), equal + unequal, equal, SETTING)
    assert row["cheapest_feasible_equal"]["run"] == "e0.5" and row["cheapest_feasible_mean"]["run"] == "u"
    assert row["cheapest_feasible_equal"]["kl_difference"]["verdict"] == "cheaper"
    assert row["cheapest_feasible_mean"]["kl_difference"]["verdict"] == "dearer" and not row["claim_holds"]
    assert row["claim_holds_vs_equal_weights"]
