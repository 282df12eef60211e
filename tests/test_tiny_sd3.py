"""The embedded tiny flow-matching model cdalign/tiny-shapes-sd3: it loads as a
StableDiffusion3Pipeline without T5, its configs are what its model card says, it reuses
tiny-shapes-sd's trained VAE and text encoder, a short call draws 64x64 images, and the
untrained-component builder is deterministic for a seed."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cdalign.models.pretraining_sd3 import RepeatedContextTokenAttention, t5_placeholder_tokens
from cdalign.models.tiny_pretrained import (
    RECOMMENDED_SD3_GUIDANCE_SCALE,
    SD3_SCHEDULER_SHIFT,
    build_untrained_sd3_components,
    tiny_shapes_sd3_path,
    tiny_shapes_sd_path,
)

RECIPE_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_tiny_sd3.yaml"


@pytest.fixture(scope="module")
def folder() -> Path:
    return tiny_shapes_sd3_path()


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_loads_as_an_sd3_pipeline_without_t5(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None


def test_configs_match_the_recipe_and_the_card(folder, pipe):
    """The shipped model's first training stage is the recipe's config, every stage's command
    (the recipe plus the flags that stage changed) is on the card, and the card's architecture
    table is the one the configs and training log produce (so the card cannot drift from the weights)."""
    from cdalign.publishing.tiny_card import _sd3_commands, architecture_table, training_stages

    recipe = yaml.safe_load(RECIPE_CONFIG.read_text())
    log = json.loads((folder / "training_log.json").read_text())
    assert log["architecture"] == "sd3"
    first = training_stages(log)[0]["config"]
    assert {k: first[k] for k in recipe if k != "output_dir"} == {k: v for k, v in recipe.items() if k != "output_dir"}
    for stage in training_stages(log)[1:]:  # a continued stage keeps the architecture (the recipe's)
        assert all(stage["config"][k] == recipe[k] for k in ("transformer_layers", "attention_heads", "attention_head_dim", "position_step"))
    t = pipe.transformer.config
    assert (t.num_layers, t.num_attention_heads, t.attention_head_dim) == (
        recipe["transformer_layers"],
        recipe["attention_heads"],
        recipe["attention_head_dim"],
    )
    assert (t.sample_size, t.patch_size, t.in_channels, t.out_channels) == (16, recipe.get("patch_size", 2), 4, 4)
    clip = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert t.joint_attention_dim >= clip
    assert t.pooled_projection_dim == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert pipe.scheduler.config.shift == SD3_SCHEDULER_SHIFT and pipe.scheduler.config.num_train_timesteps == 1000
    vae = pipe.vae.config
    assert isinstance(vae.shift_factor, float)
    assert vae.shift_factor == pytest.approx(log["vae_shift_factor"])
    assert vae.scaling_factor == pytest.approx(log["vae_scaling_factor"])
    card = (folder / "README.md").read_text()
    assert architecture_table(folder, log) in card
    assert "# cdalign/tiny-shapes-sd3" in card and "StableDiffusion3Pipeline" in card
    assert f"guidance scale {RECOMMENDED_SD3_GUIDANCE_SCALE}" in card
    assert _sd3_commands(log) in card


def test_vae_is_tiny_shapes_sd_s_and_the_text_encoders_are_what_the_log_says(folder, pipe):
    """The VAE is tiny-shapes-sd's, unchanged; the text encoders are its text encoder
    unchanged when no stage trained them, changed (identity projection kept) when one did,
    and the card says which."""
    from diffusers import AutoencoderKL
    from cdalign.publishing.tiny_card import text_encoder_stages
    from transformers import CLIPTextModel

    base = tiny_shapes_sd_path()
    vae = AutoencoderKL.from_pretrained(base / "vae")
    for (name, a), b in zip(pipe.vae.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(a, b), name
    text = CLIPTextModel.from_pretrained(base / "text_encoder").state_dict()
    log = json.loads((folder / "training_log.json").read_text())
    trained = bool(text_encoder_stages(log))
    card = (folder / "README.md").read_text()
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        mine = encoder.text_model.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in text.items()) != trained
        assert torch.equal(encoder.text_projection.weight, torch.eye(encoder.config.hidden_size))
    assert ("then trained with the transformer" in card) == trained
    assert ("trained CLIP text encoder, frozen" in card) != trained


def test_card_says_which_stages_trained_the_text_encoders():
    from cdalign.publishing.tiny_card import _sd3_remedy, _sd3_text_encoder_training, text_encoder_stages

    frozen = {"config": {"train_text_encoders": False, "text_encoder_lr": 4e-4}}
    trained = {"config": {"train_text_encoders": True, "text_encoder_lr": 4e-4}}
    assert text_encoder_stages(frozen) == []
    assert "frozen; it serves as both" in _sd3_text_encoder_training(frozen)
    assert "--train_text_encoders true" in _sd3_remedy(frozen)
    one = _sd3_text_encoder_training(trained)
    assert "trained apart, jointly with the transformer (AdamW lr 0.0004" in one and "stage" not in one
    assert "serves as both" not in one and "--train_text_encoders" not in _sd3_remedy(trained)
    later = {**trained, "previous_stages": [frozen]}
    assert text_encoder_stages(later) == [2]
    assert "jointly with the transformer in stage 2 " in _sd3_text_encoder_training(later)


def test_card_names_a_setting_per_stage_only_where_stages_differ():
    from cdalign.publishing.tiny_card import _per_stage, _timestep_sampling

    first = {"config": {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}}
    second = {"config": {**first["config"]}, "previous_stages": [first]}
    assert _per_stage(second, _timestep_sampling) == "logit-normal (mean 0.0, std 1.0)"
    third = {"config": {**first["config"], "logit_mean": -0.5}, "previous_stages": [first, second]}
    assert _per_stage(third, _timestep_sampling) == (
        "logit-normal (mean 0.0, std 1.0) in stages 1, 2; logit-normal (mean -0.5, std 1.0) in stage 3"
    )


def test_card_interval_of_a_share_is_the_normal_approximation_over_the_images():
    from cdalign.publishing.tiny_card import proportion_ci

    lo, hi = proportion_ci(0.625, 192)  # 120 of 192
    half = 1.959964 * math.sqrt(0.625 * 0.375 * 192 / 191 / 192)  # sample std (n - 1), as mean_and_ci
    assert (lo, hi) == pytest.approx((0.625 - half, 0.625 + half))
    assert proportion_ci(1.0, 10) == (1.0, 1.0) and proportion_ci(0.0, 10) == (0.0, 0.0)


def test_weights_are_small(folder):
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 12e6


def test_short_call_returns_64px_images(pipe):
    out = pipe(
        ["a large red circle on a white background", "a small blue square on a black background"],
        num_inference_steps=4,
        guidance_scale=RECOMMENDED_SD3_GUIDANCE_SCALE,
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
        output_type="np",
    ).images
    assert out.shape == (2, 64, 64, 3)
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert np.abs(out[0] - out[1]).mean() > 2 / 255


def test_builder_is_deterministic_for_a_seed():
    state = torch.random.get_rng_state()
    a = build_untrained_sd3_components(seed=3)["transformer"].state_dict()
    b = build_untrained_sd3_components(seed=3)["transformer"].state_dict()
    c = build_untrained_sd3_components(seed=4)["transformer"].state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _pretrain(tmp_path, *flags):
    """The SD3 pretraining recipe as a user runs it (its YAML, CLI overrides), 2 tiny steps."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "recipes" / "pretrain_tiny.py"), "--config", str(RECIPE_CONFIG),
           "--transformer_steps", "2", "--batch_size", "2", "--warmup_steps", "1", *flags]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_pretraining_trains_the_text_encoders_when_asked_and_continues_a_stage(tmp_path):
    """``--train_text_encoders true`` changes both CLIP encoders (their identity projection
    kept); a second stage (``--init_transformer``) starts from the first stage's transformer and
    text encoders and lists it under previous_stages, and the card's commands name both stages."""
    from diffusers import StableDiffusion3Pipeline
    from cdalign.publishing.tiny_card import _sd3_commands
    from transformers import CLIPTextModel

    first, second = tmp_path / "stage1", tmp_path / "stage2"
    _pretrain(tmp_path, "--output_dir", str(first), "--train_text_encoders", "true")
    _pretrain(tmp_path, "--output_dir", str(second), "--init_transformer", str(first), "--seed", "1", "--train_text_encoders", "false")
    one = StableDiffusion3Pipeline.from_pretrained(str(first), text_encoder_3=None, tokenizer_3=None)
    base = CLIPTextModel.from_pretrained(tiny_shapes_sd_path() / "text_encoder").state_dict()
    for encoder in (one.text_encoder, one.text_encoder_2):
        mine = encoder.text_model.state_dict()
        assert any(not torch.equal(mine[k], v) for k, v in base.items())
        assert torch.equal(encoder.text_projection.weight, torch.eye(encoder.config.hidden_size))
    assert one.transformer.config.patch_size == yaml.safe_load(RECIPE_CONFIG.read_text())["patch_size"]
    log = json.loads((second / "training_log.json").read_text())
    assert [s["config"]["seed"] for s in log["previous_stages"]] == [0] and log["total_transformer_steps"] == 4
    assert log["previous_stages"][0]["text_encoders"].startswith("trained jointly")
    commands = _sd3_commands(log)
    assert commands.count("accelerate launch recipes/pretrain_tiny.py --config recipes/pretrain_tiny_sd3.yaml") == 2
    # stage 1 trained them as the recipe does (no flag), stage 2 kept them frozen (flag written)
    assert commands.count("--train_text_encoders") == 1 and "--train_text_encoders false" in commands
    assert "--init_transformer <stage 1's output_dir>" in commands
    for stage in (first, second):  # where a component was loaded from is not saved with it
        assert not [p for p in stage.glob("*/config.json") if "_name_or_path" in p.read_text()]
    two = StableDiffusion3Pipeline.from_pretrained(str(second), text_encoder_3=None, tokenizer_3=None)
    for a, b in ((one.text_encoder, two.text_encoder), (one.text_encoder_2, two.text_encoder_2)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # carried over
    with pytest.raises(AssertionError, match="train_text_encoders: expected bool, got 'maybe'"):  # exit code 2, the flag named
        _pretrain(tmp_path, "--output_dir", str(tmp_path / "bad"), "--train_text_encoders", "maybe")


def test_one_weighted_zero_token_gives_the_pipelines_velocities_and_gradients():
    """Pretraining feeds one zero T5 token whose attention logit carries + log 256
    (RepeatedContextTokenAttention) instead of the pipeline's 256 zero tokens: the velocities and
    every parameter's gradient equal those of the plain diffusers call on the full prompt
    embedding; without the log 256 they do not."""
    import copy

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(text_encoder_3=None, tokenizer_3=None, **build_untrained_sd3_components(seed=0, patch_size=1))
    full_model = pipe.transformer
    with torch.no_grad():  # the zero-initialised output layers would hide any difference
        generator = torch.Generator().manual_seed(1)
        for p in full_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    copies = t5_placeholder_tokens(pipe)
    assert copies == 256
    captions = ["a red circle", "a large blue square on a white background"]
    full, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
    short, _, pooled_short, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False, max_sequence_length=1)
    assert full.shape[1] == short.shape[1] + copies - 1 and torch.equal(pooled, pooled_short)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([300.0, 800.0])

    def run(model, embeds):
        out = model(x, embeds, pooled, t).sample
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out.detach(), grads

    reference, reference_grads = run(full_model, full)
    collapsed = copy.deepcopy(full_model)
    collapsed.set_attn_processor(RepeatedContextTokenAttention(copies))
    out, grads = run(collapsed, short)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, reference_grads):
        torch.testing.assert_close(g, r, atol=1e-4 * max(1.0, r.abs().max().item()), rtol=1e-4)
    collapsed.set_attn_processor(RepeatedContextTokenAttention(1))
    assert (collapsed(x, short, pooled, t).sample - reference).abs().max() > 1e-3


def test_position_table_is_saved_with_the_weights_and_refused_when_a_stage_differs(tmp_path):
    """position_step 1 is diffusers' own table; another step is stored in pos_embed.pos_embed,
    comes back from a plain ``from_pretrained`` (so every loader samples the trained model), and
    places token i at step * i; continuing a stage with another step is refused, naming the field."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    from cdalign.models.tiny_pretrained import sincos_position_table

    default = build_untrained_sd3_components(seed=0, patch_size=1)["transformer"]
    assert torch.equal(sincos_position_table(default, 1.0), default.pos_embed.pos_embed)
    stepped = build_untrained_sd3_components(seed=0, patch_size=1, position_step=3.0)["transformer"]
    table = stepped.pos_embed.pos_embed[0]  # (16 * 16, width): first half rows (h), second half columns (w)
    width = stepped.inner_dim
    columns = get_1d_sincos_pos_embed_from_grid(width // 2, 3.0 * torch.arange(16.0), output_type="pt")
    torch.testing.assert_close(table[:16, : width // 2], columns.float())  # first row: w = 0..15
    stepped.save_pretrained(tmp_path / "t")
    assert torch.equal(SD3Transformer2DModel.from_pretrained(tmp_path / "t").pos_embed.pos_embed, stepped.pos_embed.pos_embed)

    first = tmp_path / "stage1"
    _pretrain(tmp_path, "--output_dir", str(first), "--position_step", "3")
    assert json.loads((first / "training_log.json").read_text())["config"]["position_step"] == 3.0
    saved = SD3Transformer2DModel.from_pretrained(first / "transformer")
    assert torch.equal(saved.pos_embed.pos_embed, sincos_position_table(saved, 3.0))
    with pytest.raises(AssertionError, match="position_step"):
        _pretrain(tmp_path, "--output_dir", str(tmp_path / "stage2"), "--init_transformer", str(first), "--position_step", "1")


def test_dit_initialization_starts_every_block_as_the_identity_and_predicts_zero():
    """``transformer_init: dit`` (adaLN-Zero): the modulation of every block and of the output
    is zero, so the velocity is 0 at any input; the other linear layers are Xavier with zero
    bias; an unknown initialisation is refused, naming the choices."""
    t = build_untrained_sd3_components(seed=0, patch_size=1, initialization="dit")["transformer"]
    x = torch.randn(2, 4, 16, 16)
    out = t(x, torch.randn(2, 78, 128), torch.randn(2, 128), torch.tensor([1.0, 500.0])).sample
    assert torch.equal(out, torch.zeros_like(out))
    for block in t.transformer_blocks:
        assert not block.norm1.linear.weight.any() and not block.norm1_context.linear.weight.any()
    q = t.transformer_blocks[0].attn.to_q
    bound = (6 / sum(q.weight.shape)) ** 0.5  # Xavier-uniform
    assert q.weight.abs().max() <= bound and q.weight.abs().max() > 0.9 * bound and not q.bias.any()
    default = build_untrained_sd3_components(seed=0, patch_size=1)["transformer"]
    assert default.proj_out.weight.any()  # diffusers' own start is PyTorch's default, left alone
    with pytest.raises(ValueError, match="initialization='xavier'.*diffusers.*dit"):
        build_untrained_sd3_components(seed=0, initialization="xavier")


def test_shipped_position_table_is_the_logged_one(folder, pipe):
    """A plain StableDiffusion3Pipeline load samples with the position table the model was
    trained with (its training log's position_step), not diffusers' default."""
    from cdalign.models.tiny_pretrained import sincos_position_table

    step = json.loads((folder / "training_log.json").read_text())["config"].get("position_step", 1.0)
    assert torch.equal(pipe.transformer.pos_embed.pos_embed, sincos_position_table(pipe.transformer, step))
