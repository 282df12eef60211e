"""Rewards: registry, image statistics (against independent numpy/scipy versions), JPEG
compressibility, differentiable preprocessing, and offline behaviour of model rewards."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

import cdalign.rewards as rewards
from cdalign.hub_access.model_files import RewardModelNotFoundError
from cdalign.rewards import REWARDS, Reward, available_rewards, build_reward
from cdalign.rewards._preprocess import (
    ImageTransform,
    transform_from_preprocessor_config,
)

STATISTICS = ["brightness", "global_contrast", "local_contrast", "saturation", "colorfulness"]
MODEL_REWARDS = ["aesthetic", "clipscore", "pickscore", "hps", "imagereward", "mps"]


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 17, 23, generator=generator, dtype=torch.float32)


# --- independent numpy references (float64) -------------------------------------------


def np_luminance(x):
    return 0.2126 * x[:, 0] + 0.7152 * x[:, 1] + 0.0722 * x[:, 2]


def np_brightness(x):
    return np_luminance(x).mean(axis=(1, 2))


def np_global_contrast(x):
    return np_luminance(x).std(axis=(1, 2))  # ddof=0


def np_local_contrast(x):
    y = np_luminance(x)
    # scipy's "mirror" mode reflects about the edge pixel (d c b | a b c d | c b a), like
    # torch's "reflect"; truncate=2 with sigma=1 gives the 5-tap kernel.
    blurred = np.stack([ndimage.gaussian_filter(img, sigma=1.0, truncate=2.0, mode="mirror") for img in y])
    return np.abs(y - blurred).mean(axis=(1, 2))


def np_saturation(x):
    cmax, cmin = x.max(axis=1), x.min(axis=1)
    return ((cmax - cmin) / (cmax + 1e-8)).mean(axis=(1, 2))


def np_colorfulness(x):
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    std = np.sqrt(rg.std(axis=(1, 2)) ** 2 + yb.std(axis=(1, 2)) ** 2)
    mean = np.sqrt(rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2)
    return std + 0.3 * mean


NUMPY_REFERENCE = {
    "brightness": np_brightness,
    "global_contrast": np_global_contrast,
    "local_contrast": np_local_contrast,
    "saturation": np_saturation,
    "colorfulness": np_colorfulness,
}


# --- registry ---------------------------------------------------------------------------


def test_every_paper_reward_is_registered():
    assert set(STATISTICS + MODEL_REWARDS + ["jpeg_compressibility"]) <= set(available_rewards())


def test_unknown_reward_name_raises_value_error_listing_allowed_names():
    with pytest.raises(ValueError) as info:
        build_reward("brightnes")
    message = str(info.value)
    assert "brightnes" in message
    for name in available_rewards():
        assert name in message


def test_build_reward_returns_a_named_frozen_reward_module():
    reward = build_reward("saturation")
    assert isinstance(reward, Reward) and isinstance(reward, torch.nn.Module)
    assert reward.name == "saturation" and reward.differentiable


def test_importing_rewards_loads_no_transformers_or_pil():
    import subprocess
    import sys

    code = "import sys, cdalign.rewards; print(any(m.split('.')[0] in ('transformers', 'PIL') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_reward_stays_in_eval_mode_when_a_parent_trains():
    parent = torch.nn.ModuleDict({"r": build_reward("brightness")})
    parent.train()
    assert not parent["r"].training


# --- image statistics -------------------------------------------------------------------


@pytest.mark.parametrize("name", STATISTICS)
def test_image_statistic_matches_independent_numpy_implementation(name, images):
    scores = build_reward(name)(images, ["p"] * len(images))
    expected = NUMPY_REFERENCE[name](images.double().numpy())
    assert scores.shape == (len(images),) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", STATISTICS)
def test_image_statistic_gradient_is_finite_and_nonzero(name, images):
    images = images.clone().requires_grad_(True)
    build_reward(name)(images, ["p"] * len(images)).sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["colorfulness", "global_contrast", "saturation"])
def test_image_statistic_gradient_is_finite_on_a_flat_gray_image(name):
    images = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    build_reward(name)(images, ["p", "p"]).sum().backward()
    assert torch.isfinite(images.grad).all()


def test_statistics_order_images_as_their_names_say():
    dark, bright = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.8)
    gray = torch.full((1, 3, 16, 16), 0.5)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 0.9
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    checker = checker.float().expand(1, 3, 16, 16)
    assert build_reward("brightness")(bright, ["p"]) > build_reward("brightness")(dark, ["p"])
    assert build_reward("saturation")(red, ["p"]) > build_reward("saturation")(gray, ["p"])
    assert build_reward("colorfulness")(red, ["p"]) > build_reward("colorfulness")(gray, ["p"])
    assert build_reward("local_contrast")(checker, ["p"]) > build_reward("local_contrast")(gray, ["p"])
    assert build_reward("global_contrast")(checker, ["p"]) > build_reward("global_contrast")(gray, ["p"])


def test_local_contrast_blur_uses_reflect_padding():
    from cdalign.rewards.image_stats import gaussian_blur

    # A ramp is preserved by a symmetric blur only in the interior; reflect padding
    # mirrors it at the border, which the scipy "mirror" reference reproduces exactly.
    y = torch.linspace(0, 1, 9).repeat(9, 1)[None]
    expected = ndimage.gaussian_filter(y[0].double().numpy(), sigma=1.0, truncate=2.0, mode="mirror")
    np.testing.assert_allclose(gaussian_blur(y)[0].numpy(), expected, atol=1e-6)


def test_statistic_rejects_images_with_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_reward("brightness")(torch.rand(2, 4, 8, 8), ["p", "p"])


# --- jpeg compressibility ---------------------------------------------------------------


def test_jpeg_compressibility_is_flagged_non_differentiable_and_returns_batch_scores():
    reward = build_reward("jpeg_compressibility")
    assert reward.differentiable is False
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    scores = reward(images, ["p", "p"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert not scores.requires_grad
    assert (scores < 0).all()  # minus a size in kB


def test_jpeg_compressibility_scores_a_flat_image_above_noise():
    flat = torch.full((1, 3, 64, 64), 0.4)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    scores = build_reward("jpeg_compressibility")(torch.cat([flat, noise]), ["p", "p"])
    assert scores[0] > scores[1]


def test_jpeg_compressibility_is_minus_the_pil_jpeg_size_in_kilobytes():
    import io

    from PIL import Image

    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    array = (image[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert build_reward("jpeg_compressibility")(image, ["p"]).item() == pytest.approx(-buffer.tell() / 1000)


# --- differentiable preprocessing -------------------------------------------------------


def test_image_transform_only_normalises_an_image_already_at_its_size():
    transform = ImageTransform(32, (32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    images = torch.rand(2, 3, 32, 32)
    expected = (images - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(transform(images), expected)


def test_image_transform_resizes_shorter_side_then_center_crops_with_gradient():
    transform = ImageTransform(16, (16, 16), (0.0,) * 3, (1.0,) * 3)
    images = torch.rand(2, 3, 40, 64, requires_grad=True)
    out = transform(images)
    assert out.shape == (2, 3, 16, 16)
    out.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_image_transform_is_close_to_pil_bicubic_resize():
    from PIL import Image

    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    images = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear")  # smooth content
    array = (images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(array).resize((32, 32), Image.BICUBIC)).astype(np.float32) / 255
    ours = ImageTransform(32, (32, 32), (0.0,) * 3, (1.0,) * 3)(images)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - pil).mean() < 0.01


def test_preprocessor_config_in_both_transformers_formats_gives_the_same_transform(tmp_path):
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    old = {"size": 224, "crop_size": 224, "do_center_crop": True, "image_mean": mean, "image_std": std, "resample": 3}
    new = dict(old, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    transforms = []
    for i, config in enumerate((old, new)):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(config))
        transforms.append(transform_from_preprocessor_config(path))
    for t in transforms:
        assert (t.resize_shortest, t.crop_size, t.mode) == (224, (224, 224), "bicubic")
        torch.testing.assert_close(t.mean.flatten(), torch.tensor(mean))


# --- offline behaviour of model-based rewards -------------------------------------------

UNCACHED = "cdalign-test/definitely-not-cached"

# Every Hub id a reward resolves, replaced by an uncached one; the first one resolved
# must be named in the error.
OFFLINE_KWARGS = {
    "aesthetic": dict(model_id=UNCACHED + "-head", clip_model_id=UNCACHED),
    "clipscore": dict(model_id=UNCACHED),
    "pickscore": dict(model_id=UNCACHED, processor_id=UNCACHED + "-processor"),
    "hps": dict(model_id=UNCACHED + "-hps", clip_config_id=UNCACHED),
    "imagereward": dict(model_id=UNCACHED, tokenizer_id=UNCACHED + "-tokenizer"),
    "mps": dict(model_id=UNCACHED + "-mps", clip_config_id=UNCACHED),
}


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache (whatever this machine has cached)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_model_reward_offline_with_uncached_id_fails_fast_naming_the_hub_id(name, empty_hub_cache):
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        build_reward(name, **OFFLINE_KWARGS[name])
    assert time.perf_counter() - start < 10
    assert isinstance(info.value, RewardModelNotFoundError)
    message = str(info.value)
    assert UNCACHED in message
    assert "hf download" in message and "HF_HUB_OFFLINE" in message


# The first Hub repo each reward resolves with its default arguments.
DEFAULT_FIRST_HUB_ID = {
    "aesthetic": "openai/clip-vit-large-patch14",
    "clipscore": "openai/clip-vit-large-patch14",
    "pickscore": "yuvalkirstain/PickScore_v1",
    "hps": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "imagereward": "THUDM/ImageReward",
}


@pytest.mark.parametrize("name", sorted(DEFAULT_FIRST_HUB_ID))
def test_model_reward_defaults_to_the_papers_hub_weights(name, empty_hub_cache):
    with pytest.raises(RewardModelNotFoundError) as info:
        build_reward(name)
    assert repr(DEFAULT_FIRST_HUB_ID[name]) in str(info.value)


def test_mps_without_model_id_explains_where_the_weights_are():
    with pytest.raises(RewardModelNotFoundError, match="Google Drive"):
        build_reward("mps")


def test_model_reward_with_missing_local_folder_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(RewardModelNotFoundError, match="nowhere"):
        build_reward("clipscore", model_id=missing)


def test_rewards_package_exports_the_interface():
    assert rewards.REWARDS is REWARDS
    assert callable(rewards.build_reward) and callable(rewards.available_rewards)
