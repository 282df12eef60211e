"""FLUX.1 (``FluxPipeline``, issue 16) as a third model family, on the tiny FLUX pipeline
built in code (``cdalign/tiny-random-flux``): the ODE against diffusers' own pipeline (packed
latents, guidance embedding, dynamic time shift), no unconditional pass for the
guidance-distilled model, a save_pretrained round trip, alignment end to end with a LoRA that
``load_lora_weights`` reloads, and AND-composition of two FLUX LoRAs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_config

from cdalign import ConstrainedDDPOTrainer, load_pipeline
from cdalign.core.chains import FlowSDEChain
from cdalign.core.families import MODEL_FAMILIES, Conditioning, family_of
from cdalign.core.sampling import DiffusionSampler, Trajectory, initial_noise
from cdalign.models.tiny import TINY_RANDOM_FLUX_ID, build_tiny_flux_pipeline, flux_scheduler

RES = 32  # 16x16 latents, 64 packed image tokens


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


class CallCounter:
    """Counts the transformer's calls and the batch rows it saw (its forward wrapped)."""

    def __init__(self, transformer):
        self.transformer, self.calls, self.rows, self.guidance = transformer, 0, [], []
        self.forward = transformer.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            self.rows.append(kwargs["hidden_states"].shape[0])
            self.guidance.append(kwargs.get("guidance"))
            return self.forward(*args, **kwargs)

        self.transformer.forward = counted
        return self

    def __exit__(self, *exc):
        self.transformer.forward = self.forward


# ----------------------------------------------------------------------------- sampling = FluxPipeline
def test_ode_sampling_reproduces_the_diffusers_flux_pipeline(pipe):
    sampler = DiffusionSampler(pipe, 6, 0.0, 3.5, RES, "cpu")
    with torch.no_grad():
        ours = sampler.sample(sampler.guided(["a red circle", "a blue square"]), [3, 4], decode=False)
        x_T, _ = initial_noise([3, 4], sampler.latent_shape, 6)
        c, h, w = sampler.latent_shape
        packed = pipe._pack_latents(x_T, 2, c, h, w)
        theirs = pipe(["a red circle", "a blue square"], num_inference_steps=6, guidance_scale=3.5, latents=packed,
                      height=RES, width=RES, output_type="latent").images
    theirs = pipe._unpack_latents(theirs, RES, RES, pipe.vae_scale_factor)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the chain's schedule is the one FluxPipeline set on its scheduler (dynamic shift, FLUX's sigmas)
    assert torch.allclose(sampler.chain.timesteps, pipe.scheduler.timesteps.float())
    assert torch.allclose(sampler.chain.flow_sigma.float(), pipe.scheduler.sigmas[:-1])


def test_the_time_shift_depends_on_the_resolution_and_is_required(pipe):
    small, large = (DiffusionSampler(pipe, 4, 0.7, 3.5, r, "cpu") for r in (RES, 4 * RES))
    assert small.latent_shape == (4, 16, 16) and large.latent_shape == (4, 64, 64)
    assert bool((large.chain.flow_sigma[1:] > small.chain.flow_sigma[1:]).all())  # more tokens, more shift
    with pytest.raises(ValueError, match="dynamic.*mu"):
        FlowSDEChain.from_scheduler(flux_scheduler(), 4, 0.7)
    with pytest.raises(ValueError, match="multiple of 4"):
        DiffusionSampler(pipe, 4, 0.7, 3.5, 30, "cpu")


def test_no_unconditional_pass_for_the_guidance_distilled_model(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.5, RES, "cpu")
    assert family_of(pipe).name == "flux" and not family_of(pipe).cfg and not sampler.uses_cfg
    guided = sampler.guided(["a red circle", "a blue square"])
    assert not guided.use_cfg and len(guided.cond) == 2
    with CallCounter(pipe.transformer) as counter, torch.no_grad():
        sampler.sample(guided, [0, 1], decode=False)
    assert counter.calls == 4 and counter.rows == [2] * 4  # one conditional pass per step, no doubled batch
    assert all(torch.equal(g, torch.full((2,), 3.5)) for g in counter.guidance)  # the scale is an input
    with CallCounter(pipe.transformer) as counter, torch.no_grad():
        sampler.guided(["a red circle"], guidance_scale=7.0)(torch.randn(1, 4, 16, 16), sampler.chain.timesteps[0])
    assert torch.equal(counter.guidance[0], torch.full((1,), 7.0))


def test_flux_schnell_without_guidance_embeds_runs_with_neither(pipe):
    schnell = build_tiny_flux_pipeline(seed=0, guidance_embeds=False)
    sampler = DiffusionSampler(schnell, 4, 0.0, 3.5, RES, "cpu")
    cond = sampler.encode(["a red circle"])
    assert cond.guidance is None and not sampler.uses_cfg
    with CallCounter(schnell.transformer) as counter, torch.no_grad():
        x0 = sampler.sample(sampler.guided(["a red circle"]), [0], decode=False)
        theirs = schnell(["a red circle"], num_inference_steps=4, height=RES, width=RES, output_type="latent",
                         latents=schnell._pack_latents(initial_noise([0], sampler.latent_shape, 4)[0], 1, 4, 16, 16)).images
    assert counter.rows[:4] == [1] * 4 and all(g is None for g in counter.guidance)
    assert torch.allclose(x0, schnell._unpack_latents(theirs, RES, RES, schnell.vae_scale_factor), atol=1e-5)


def test_conditioning_keeps_the_guidance_rows_aligned(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 2.0, RES, "cpu")
    cond = sampler.encode(["a", "b"])
    assert cond.pooled.shape == (2, 32) and cond.embeds.shape == (2, 512, 32) and cond.guidance.tolist() == [2.0, 2.0]
    both = Conditioning.cat([cond, sampler.encode(["c"], 5.0)])
    assert both.guidance.tolist() == [2.0, 2.0, 5.0] and len(both[1:]) == 2 and both[2:].guidance.tolist() == [5.0]
    assert both[2:].expand(3).guidance.tolist() == [5.0] * 3 and both.repeat(2).guidance.shape == (6,)
    assert both.to(torch.float64).guidance.dtype == torch.float64


def test_the_family_registry_and_its_fsdp_blocks(pipe):
    assert "FluxPipeline" in MODEL_FAMILIES.names()
    fam = family_of(pipe)
    assert fam.denoiser_class == "FluxTransformer2DModel" and fam.text_encoder_modules(pipe) == [pipe.text_encoder,
                                                                                               pipe.text_encoder_2]
    assert len(fam.blocks(pipe.transformer)) == 2 and not fam.denoising_loss  # 1 double + 1 single stream block


def test_a_saved_tiny_flux_folder_loads_and_samples_the_same(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_pipeline(str(tmp_path / "flux"))
    assert type(loaded).__name__ == "FluxPipeline" and type(loaded.tokenizer_2).__name__.startswith("T5Tokenizer")
    a, b = (DiffusionSampler(p, 4, 0.7, 3.5, RES, "cpu") for p in (pipe, loaded))
    with torch.no_grad():
        assert torch.allclose(a.sample(a.guided(["a red circle"]), [5]), b.sample(b.guided(["a red circle"]), [5]),
                              atol=1e-6)


def test_trajectory_log_probs_of_flux_steps_are_finite(pipe):
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.5, RES, "cpu")
    traj = Trajectory()
    with torch.no_grad():
        sampler.sample(sampler.guided(["a red circle", "a cyan square"]), [0, 1], trajectory=traj, decode=False)
    assert len(traj.states) == 5 and all(bool(torch.isfinite(lp).all()) for lp in traj.log_probs)


# ----------------------------------------------------------------------------- alignment end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux-e2e")
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp, pretrained_model_name_or_path=TINY_RANDOM_FLUX_ID, eta=0.7,
                                                 kl_estimator="path", guidance_scale=3.5, num_inference_steps=4))
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    report = trainer.train()
    return trainer, before, report


def test_flux_training_changes_the_transformer_lora_and_moves_the_duals(trained):
    trainer, before, report = trained
    after = trainer._lora_params()
    assert all(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in before)
    assert sum(not torch.equal(before[k], after[k].detach()) for k in before) > 0
    violated, satisfied = trainer.duals.multipliers.tolist()
    assert violated > 0.5 and satisfied < 0.5
    assert trainer.history[0]["kl"] == 0.0 and report["kl"]["mean"] > 0.0


def test_saved_flux_lora_reloads_with_load_lora_weights_and_reproduces_samples(trained):
    trainer, _, _ = trained
    out = trainer.output_dir
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    fresh = load_pipeline(TINY_RANDOM_FLUX_ID)
    fresh.load_lora_weights(str(out))
    cfg = trainer.config
    ours = DiffusionSampler(fresh, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, "cpu")
    with torch.no_grad():
        reloaded = ours.sample(ours.guided(["a red circle"]), [11])
        trained_images = trainer.sampler.sample(trainer.sampler.guided(["a red circle"]), [11])
        fresh.transformer.disable_adapters()
        base = ours.sample(ours.guided(["a red circle"]), [11])
    assert torch.allclose(reloaded, trained_images, atol=1e-5)
    assert not torch.allclose(reloaded, base, atol=1e-4)


def test_fsdp2_sharded_two_processes_agree_with_one_process(tmp_path):
    """The transformer sharded with FLUX's FSDP2 units (double- and single-stream blocks) over
    2 gloo processes on the CPU: the same λ and KL as one unsharded process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "scripts" / "mp_worker.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    flags = ["--model", TINY_RANDOM_FLUX_ID, "--eta", "0.7"]
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    for cmd, cwd in (([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(worker), str(two), "2", "2", "--shard", *flags], two),
                     ([sys.executable, str(worker), str(one), "4", "2", *flags], one)):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    m2, m1 = (json.loads((d / "rank0.json").read_text()) for d in (two, one))
    assert m2["world"] == 2 and m2["sharded"] and m1["world"] == 1
    assert m2["multipliers"] == pytest.approx(m1["multipliers"], rel=1e-4, abs=1e-6)
    assert m2["report_kl"] == pytest.approx(m1["report_kl"], rel=1e-3, abs=1e-8)


# ----------------------------------------------------------------------------- composition
def save_random_flux_lora(path, seed: int, scale: float):
    """A LoRA with random A and B on the tiny FLUX transformer, saved by cdalign's own writer."""
    from cdalign.models.lora import add_lora_adapter, save_adapter

    pipe = build_tiny_flux_pipeline(seed=0)
    add_lora_adapter(pipe.transformer, "x", rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(pipe.transformer, "x", path)
    return path


@pytest.fixture(scope="module")
def flux_loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-loras")
    return [save_random_flux_lora(root / "a", 1, 0.5), save_random_flux_lora(root / "b", 2, 0.25)]


def test_composed_velocity_is_the_weighted_sum_without_an_uncond_pass(flux_loras):
    from cdalign.composition import Component, ComponentSet, load_lora_component, set_unet_state

    pipe = build_tiny_flux_pipeline(seed=0)
    for name, path in zip("ab", flux_loras):
        load_lora_component(pipe, name, str(path))
    sampler = DiffusionSampler(pipe, 4, 0.7, 3.5, RES, "cpu")
    prompts = ["a red circle", "a blue square"]
    comps = ComponentSet(sampler, [Component("a", "a"), Component("b", "b"), Component("base", None)])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), sampler.chain.timesteps[1]
    with torch.no_grad(), CallCounter(pipe.transformer) as counter:
        composed = comps.composed(prompts, weights)(x, t)
    assert counter.rows == [2, 2, 2]  # one call per adapter, the batch's conditional rows only
    with torch.no_grad():
        singles = []
        for adapter in ("a", "b", None):
            set_unet_state(pipe.transformer, adapter)
            singles.append(sampler.guided(prompts)(x, t))
    assert torch.allclose(composed, sum(float(w) * v for w, v in zip(weights, singles)), atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


def test_and_composition_of_two_flux_loras_end_to_end(flux_loras, tmp_path):
    from cdalign.composition import ConstrainedComposer
    from cdalign.composition.config import config_from_dict

    cfg = config_from_dict({
        "pretrained_model_name_or_path": TINY_RANDOM_FLUX_ID, "eta": 0.7, "resolution": RES,
        "components": [{"name": "a", "path": str(flux_loras[0])}, {"name": "b", "path": str(flux_loras[1])}],
        "prompts": "shapes", "num_inference_steps": 4, "guidance_scale": 3.5,
        "dual": {"steps": 2, "batch_size": 2, "lr": 0.3, "normalize": True},
        "distill": {"enabled": True, "steps": 2, "batch_size": 1, "timesteps_per_chain": 2},
        "eval_batches": 1, "num_grid_images": 2, "output_dir": str(tmp_path / "run"),
    })
    report = ConstrainedComposer(cfg).run()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    mu = saved["learned_weights"]
    assert sum(mu.values()) == pytest.approx(1.0) and all(v >= 0 for v in mu.values())
    for model in ("equal_weights", "constrained"):
        kl = saved["models"][model]["kl"]
        assert set(kl) == {"a", "b"} and all(v["mean"] > 0 for v in kl.values())
    assert report["learned_weights"] == mu
    fresh = load_pipeline(TINY_RANDOM_FLUX_ID)
    fresh.load_lora_weights(str(tmp_path / "run" / "distilled"), adapter_name="distilled")
    assert "distilled" in fresh.transformer.peft_config


def test_policy_gradient_estimator_runs_on_the_flux_chain(tmp_path):
    import math

    trainer = ConstrainedDDPOTrainer(tiny_config(
        tmp_path, pretrained_model_name_or_path=TINY_RANDOM_FLUX_ID, eta=0.7, estimator="policy_gradient",
        images_per_prompt=2, backprop_steps=4, guidance_scale=3.5,
        constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5}],
        max_steps=2, num_inference_steps=4,
    ))
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    report = trainer.train()
    after = trainer._lora_params()
    assert sum(not torch.equal(before[k], after[k].detach()) for k in before) > 0
    assert report["estimator"]["name"] == "policy_gradient" and math.isfinite(report["kl"]["mean"])


# ----------------------------------------------------------------------------- the GPU recipe
def test_the_flux_dev_recipe_parses():
    from pathlib import Path

    import cdalign

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "flux" / "multi_reward.yaml"
    cfg = cdalign.parse_config(["--config", str(recipe)])
    assert cfg.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev" and cfg.resolution == 1024
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing and cfg.eta == 0.7
    assert [c.reward for c in cfg.constraints] == ["mps", "saturation", "local_contrast"]
    assert "accelerate_configs/fsdp.yaml" in recipe.read_text()
