"""evaluation/independent_check.py scores a finished run with plain diffusers (the pipeline
class its model folder names), fresh seeds and numpy metrics (cdalign.evaluation.independent):
for a UNet model and a flow model, each run's LoRA against the base."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer
from cdalign.evaluation import independent
from cdalign.models.tiny import build_tiny_pipeline, build_tiny_sd3_pipeline

SCRIPT = Path(__file__).resolve().parents[1] / "evaluation" / "independent_check.py"

BUILDERS = {"sd": (build_tiny_pipeline, 1.0), "sd3": (build_tiny_sd3_pipeline, 0.7)}  # builder, eta


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_independent_check_scores_a_run_with_plain_diffusers(family, tmp_path):
    build, eta = BUILDERS[family]
    model = tmp_path / "model"
    build(seed=0).save_pretrained(model)
    ConstrainedDDPOTrainer(tiny_config(
        tmp_path, pretrained_model_name_or_path=str(model), eta=eta, learning_rate=5e-2,
        constraints=[{"reward": "colorfulness", "direction": "high", "threshold": 20.0, "normalize": True},
                     {"reward": "brightness", "direction": "high", "threshold": -20.0, "normalize": True}],
    )).train()
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--num_images", "4", "--batch_size", "4", "--names", "aligned",
                           "--grid", str(tmp_path / "grid.png"), "--grid_images", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"independent check: diffusers {type(build(seed=0)).__name__}()" in out
    table = json.loads((run / "independent_check.json").read_text())["results"]
    assert set(table) == {"base", "aligned"} and table["base"]["colorfulness"]["n"] == 4
    assert table["aligned"]["colorfulness"]["difference"]["mean"] != 0.0  # the LoRA is loaded and changes images
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[1] > 2 * 32  # two rows: the base model and the run


def test_the_checks_jpeg_formula_matches_the_reward_on_saved_8_bit_images():
    """PIL's JPEG size of the 8-bit image, computed apart from cdalign's reward, agrees with it."""
    import numpy as np
    import torch

    from cdalign.rewards.image_stats import jpeg_compressibility

    g = np.random.default_rng(0)
    u8 = g.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    u8[1] = 200  # a flat image compresses better
    ours = independent.jpeg_compressibility_np(u8)
    theirs = jpeg_compressibility(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255).numpy()
    assert np.allclose(ours, theirs) and ours[1] > ours[0]
