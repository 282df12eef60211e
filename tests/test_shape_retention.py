"""Shape retention (cdalign.evaluation.shape_retention, run by evaluation/shape_retention.py):
a flow model finishes noised true scenes through the pipeline's own sampler; at s = 0 the VAE
round trip reads the shapes, a start at small s keeps them (so the pipeline really starts
from the noised scene), bad input exits 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdalign.evaluation import shape_retention

SCRIPT = Path(__file__).resolve().parents[1] / "evaluation" / "shape_retention.py"


@pytest.fixture(scope="module")
def pipe():
    from cdalign.models.pipeline import load_pipeline

    pipe = load_pipeline("cdalign/tiny-shapes-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_round_trip_reads_shapes_and_a_small_start_keeps_them(pipe):
    table = shape_retention.retention(pipe, scenes_seed=3, num_images=12, sigmas=[0.0, 0.05, 1.0], steps=20, guidance=5.0)
    assert list(table) == [0.0, 0.05, 1.0]
    assert all(0 <= v <= 1 for row in table.values() for v in row.values())
    assert table[0.0]["all"] >= 0.6  # VAE round trip with the model's shift / scaling factors
    assert table[0.05]["all"] >= table[0.0]["all"] - 0.2  # one Euler step from the noised scene, not fresh noise


def test_a_shifted_scheduler_still_starts_at_s(pipe):
    """The scheduler shifts the sigmas it is handed; the script passes them unshifted, so the
    first step runs at the s the latents were noised to (it raises otherwise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (0.5, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=[shape_retention.unshifted(0.3, shift)])
        assert float(scheduler.sigmas[0]) == pytest.approx(0.3, abs=1e-6)
    original = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(original.config, shift=0.5)
    try:
        table = shape_retention.retention(pipe, scenes_seed=3, num_images=4, sigmas=[0.3], steps=10, guidance=5.0)
        assert float(pipe.scheduler.sigmas[0]) == pytest.approx(0.3, abs=1e-5)
        assert len(pipe.scheduler.sigmas) == 4  # round(0.3 x 10) = 3 steps and the final 0
    finally:
        pipe.scheduler = original
    assert 0 <= table[0.3]["all"] <= 1


@pytest.mark.parametrize("flags, message", [
    (["--sigmas", "1.5"], "--sigmas"),
    (["--model", "cdalign/tiny-shapes-sd", "--sigmas", "0"], "StableDiffusion3Pipeline"),
])
def test_bad_input_exits_2_with_the_field_named(flags, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
