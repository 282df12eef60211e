"""Config builders shared by the tests: tiny runs of the seeded random pipeline."""

from cdalign.alignment.config import config_from_dict


def tiny_config(tmp_path, **overrides):
    base = dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd",
        prompts="shapes",
        output_dir=str(tmp_path / "run"),
        normalization_cache_dir=str(tmp_path / "cache"),
        objective={"type": "kl"},
        constraints=[
            # +20σ is out of reach in 3 steps (violated), −20σ holds trivially (satisfied).
            {"reward": "saturation", "direction": "high", "threshold": 20.0},
            {"reward": "local_contrast", "direction": "high", "threshold": -20.0},
        ],
        dual={"optimizer": "ascent", "lr": 0.05, "init": 0.5},
        num_inference_steps=6,
        backprop_steps=2,
        resolution=32,
        train_batch_size=2,
        max_steps=3,
        normalization_batches=2,
        eval_batches=1,
        num_grid_images=2,
        learning_rate=1e-2,
    )
    base.update(overrides)
    return config_from_dict(base)
