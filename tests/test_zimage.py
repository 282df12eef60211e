"""Z-Image (``ZImagePipeline``, issue 36's second flow model) as a model family, on the tiny
random Z-Image pipeline built in code (``cdalign/tiny-random-z-image``): sampling against
diffusers' own pipeline (each prompt's own token count, the reversed time, the negated output,
its CFG convention), the card's guidance in the pipeline's convention, a save_pretrained round
trip and OR-composition's refusal. Alignment, LoRA reload, policy gradient, evaluation,
processes and composition end to end: ``test_family_end_to_end.py``, shared with every family."""

import pytest
import torch

from cdalign import load_pipeline
from cdalign.core.chains import FlowSDEChain
from cdalign.core.families import MODEL_FAMILIES, family_of
from cdalign.core.sampling import DiffusionSampler, initial_noise
from cdalign.models.tiny import TINY_RANDOM_ZIMAGE_ID, build_tiny_zimage_pipeline

RES = 32  # 16x16 latents with the tiny factor-2 VAE, 64 image patches
PROMPTS = ["a red circle", "a blue square on a green background"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_zimage_pipeline(seed=0)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_ode_sampling_reproduces_the_diffusers_zimage_pipeline(pipe, w):
    """cdalign's guidance scale w is ZImagePipeline's w - 1 (its CFG is pos + g(pos - neg));
    w = 1: one conditional pass (Z-Image-Turbo's guidance 0)."""
    sampler = DiffusionSampler(pipe, 4, 0.0, w, RES, "cpu")
    assert family_of(pipe).name == "zimage" and isinstance(sampler.chain, FlowSDEChain) and sampler.uses_cfg == (w > 1)
    with torch.no_grad():
        ours = sampler.sample(sampler.guided(PROMPTS), [3, 4], decode=False)
        x_T, _ = initial_noise([3, 4], sampler.latent_shape, 4)
        theirs = pipe(PROMPTS, height=RES, width=RES, num_inference_steps=4, guidance_scale=w - 1, latents=x_T,
                      output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(sampler.chain.timesteps, pipe.scheduler.timesteps.float())


def test_each_prompt_keeps_its_own_token_count(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.0, RES, "cpu")
    cond = sampler.encode(PROMPTS)
    states = pipe._encode_prompt(list(PROMPTS), device="cpu")
    assert cond.embeds.shape == (2, 512, 32) and cond.mask.dtype == torch.bool
    assert cond.mask.sum(1).tolist() == [len(s) for s in states] and len(states[0]) < len(states[1])
    for row, keep, state in zip(cond.embeds, cond.mask, states):
        assert torch.equal(row[keep], state) and not row[~keep].any()
    assert cond.to(torch.bfloat16).mask.dtype == torch.bool  # the dtype of the floating parts only
    assert len(sampler.uncond(2)) == 2 and int(sampler.uncond(2).mask[0].sum()) > 0  # the empty prompt's template


def test_the_card_snippet_gives_the_pipeline_its_own_guidance_scale():
    from cdalign.publishing.cards import usage_snippet

    code = usage_snippet("Tongyi-MAI/Z-Image-Turbo", "me/lora", "a cat", 8, 3.0, 1024, pipeline_class="ZImagePipeline")
    assert "ZImagePipeline.from_pretrained('Tongyi-MAI/Z-Image-Turbo')" in code and "guidance_scale=2.0" in code
    assert MODEL_FAMILIES.get("ZImagePipeline").pipeline_guidance(1.0) == 0.0


def test_a_saved_tiny_zimage_folder_loads_as_its_pipeline_class(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "z")
    loaded = load_pipeline(str(tmp_path / "z"))
    assert type(loaded).__name__ == "ZImagePipeline" and loaded.tokenizer.chat_template
    sampler = DiffusionSampler(loaded, 2, 0.0, 3.0, RES, "cpu")
    original = DiffusionSampler(pipe, 2, 0.0, 3.0, RES, "cpu")
    with torch.no_grad():
        assert torch.allclose(sampler.sample(sampler.guided(PROMPTS[:1]), [0], decode=False),
                              original.sample(original.guided(PROMPTS[:1]), [0], decode=False), atol=1e-6)


def test_or_composition_refuses_zimage_with_the_reason(tmp_path):
    from cdalign.composition.config import config_from_dict
    from cdalign.composition.mixture import MixtureTrainer

    cfg = config_from_dict({"composition": "or", "pretrained_model_name_or_path": TINY_RANDOM_ZIMAGE_ID,
                            "datasets": [{"name": "r", "source": str(tmp_path)}, {"name": "b", "source": str(tmp_path)}],
                            "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="ZImagePipeline: the OR-composition"):
        MixtureTrainer(cfg)


def test_the_zimage_recipe_is_the_paper_constraint_set_in_bf16_without_cfg():
    from pathlib import Path

    import cdalign

    root = Path(__file__).resolve().parents[1]
    recipe = root / "recipes" / "zimage" / "multi_reward.yaml"
    cfg = cdalign.parse_config(["--config", str(recipe)])
    sd15 = cdalign.parse_config(["--config", str(root / "recipes" / "sd15" / "multi_reward.yaml")])
    assert cfg.pretrained_model_name_or_path == "Tongyi-MAI/Z-Image-Turbo" and cfg.guidance_scale == 1.0
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.eta == 0.7
    assert [(c.reward, c.direction, c.threshold) for c in cfg.constraints] == \
        [(c.reward, c.direction, c.threshold) for c in sd15.constraints]
    assert "TFLOP" in recipe.read_text() and "benchmarks/flops_zimage.py" in recipe.read_text()
