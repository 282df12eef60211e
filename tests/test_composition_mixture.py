"""OR (mixture) composition on tiny generated image folders (two colours)."""

import json

import numpy as np
import pytest

from cdalign.composition.config import config_from_dict
from cdalign.composition.mixture import MixtureTrainer, load_image_dataset
from cdalign.publishing.composition_tables import loss_table


def make_colour_folder(path, rgb, caption, n=4, noise=0.0, seed=0):
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(path / "metadata.jsonl", "w") as f:
        for i in range(n):
            arr = np.clip(np.array(rgb, dtype=float)[None, None] + noise * rng.standard_normal((32, 32, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(path / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return (make_colour_folder(root / "red", (220, 30, 30), "a red image"),
            make_colour_folder(root / "blue", (30, 30, 220), "a blue image", noise=60.0))


def mixture_config(folders, tmp_path, **over):
    d = {
        "composition": "or",
        "datasets": [{"name": "red", "source": str(folders[0])}, {"name": "blue", "source": str(folders[1])}],
        "resolution": 32, "max_steps": 4, "dual_every": 2, "train_batch_size": 2, "eval_size": 4,
        "irreducible_fit_steps": 2, "num_inference_steps": 2, "num_grid_images": 1,
        "output_dir": str(tmp_path / "run"), "dual": {"lr": 5.0},
    }
    d.update(over)
    return config_from_dict(d)


def test_image_folder_loads_with_captions(folders):
    images, captions = load_image_dataset(config_from_dict({
        "composition": "or", "datasets": [{"name": "r", "source": str(folders[0])}, {"name": "b", "source": str(folders[1])}]}).datasets[0], 32)
    assert images.shape == (4, 3, 32, 32) and captions == ["a red image"] * 4
    assert float(images[:, 0].mean()) > 0.5 and float(images[:, 2].mean()) < -0.5


def test_missing_captions_name_the_field(tmp_path):
    from PIL import Image

    (tmp_path / "nocap").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "nocap" / "0.png")
    cfg = config_from_dict({"composition": "or", "datasets": [{"name": "x", "source": str(tmp_path / "nocap")}, {"name": "y", "source": "z"}]})
    with pytest.raises(ValueError, match=r"datasets\[x\].*caption"):
        load_image_dataset(cfg.datasets[0], 16)


def test_mixture_training_ascends_weights_and_writes_outputs(folders, tmp_path):
    cfg = mixture_config(folders, tmp_path, loss="excess")
    report = MixtureTrainer(cfg).train()
    out = tmp_path / "run"
    for f in ("report.json", "pytorch_lora_weights.safetensors", "weights.png", "samples.png", "config.yaml"):
        assert (out / f).is_file(), f
    assert sum(report["weights"].values()) == pytest.approx(1.0)
    assert len(report["dual_steps"]) == 2 and set(report["irreducible_loss"]) == {"red", "blue"}
    first = report["dual_steps"][0]
    # the dataset with the larger divergence gains weight
    worse = int(np.argmax(first["divergence"]))
    assert first["new_weights"][worse] > first["weights"][worse]
    assert "| red |" in loss_table(report)


def test_raw_loss_variant_with_given_irreducible_and_threshold(folders, tmp_path):
    cfg = mixture_config(folders, tmp_path, loss="raw", max_steps=2, num_grid_images=0,
                         datasets=[{"name": "red", "source": str(folders[0]), "threshold": 1e-6},
                                   {"name": "blue", "source": str(folders[1])}])
    report = MixtureTrainer(cfg).train()
    assert report["irreducible_loss"] is None
    assert report["per_dataset"]["red"]["satisfied"] is False and report["per_dataset"]["red"]["threshold"] == 1e-6


def test_mixture_trains_an_sdxl_unet_with_its_conditioning(folders, tmp_path):
    """OR-composition on the tiny SDXL base: the ε denoising loss with SDXL's conditioning (pooled
    projection and time ids of the resolution); the LoRA loads with StableDiffusionXLPipeline's own
    load_lora_weights."""
    from cdalign import load_pipeline
    from cdalign.models.tiny import TINY_RANDOM_SDXL_ID

    cfg = mixture_config(folders, tmp_path, loss="excess", max_steps=2, num_grid_images=0,
                         pretrained_model_name_or_path=TINY_RANDOM_SDXL_ID)
    report = MixtureTrainer(cfg).train()
    assert sum(report["weights"].values()) == pytest.approx(1.0) and len(report["dual_steps"]) == 1
    pipe = load_pipeline(TINY_RANDOM_SDXL_ID)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    pipe.load_lora_weights(str(tmp_path / "run"))
    assert pipe.unet.peft_config
