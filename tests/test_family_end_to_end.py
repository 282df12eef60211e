"""Every cdalign capability end to end on every registered model family (issues 16, 36), one
test body per capability, parametrized over the tiny pipelines built in code (SD 1.x, SDXL, SD3,
FLUX.1; ``family_cases.FAMILY_CASES``, one per ``MODEL_FAMILIES`` entry): alignment with a
denoiser LoRA that diffusers' own pipeline class reloads with ``load_lora_weights``, base
predictions with the adapter off, the policy-gradient estimator, evaluation (ODE images with the
KL of a stochastic pass), 2 processes against 1, a sharded run's exact resume, and
AND-composition of two LoRAs (ε_μ = Σ μ_i ε̃_i, or v_μ = Σ μ_i ṽ_i)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_cases import FAMILY_CASES, CallCounter, denoiser, save_random_lora
from safetensors.torch import load_file
from tiny_configs import tiny_config

from cdalign import MODEL_FAMILIES, ConstrainedDDPOTrainer, load_pipeline
from cdalign.core.families import family_of
from cdalign.core.sampling import DiffusionSampler
from cdalign.models.adapters import WithAdaptersDisabled

CASES = sorted(FAMILY_CASES)


def test_every_registered_family_has_a_case():
    assert {c.pipeline_class for c in FAMILY_CASES.values()} == set(MODEL_FAMILIES.names())
    for case in FAMILY_CASES.values():
        assert family_of(load_pipeline(case.model_id)).pipeline_class == case.pipeline_class


@pytest.fixture(scope="module", params=CASES)
def trained(request, tmp_path_factory):
    case = FAMILY_CASES[request.param]
    tmp = tmp_path_factory.mktemp(f"{request.param}-e2e")
    trainer = ConstrainedDDPOTrainer(tiny_config(tmp, pretrained_model_name_or_path=case.model_id, eta=0.7,
                                                 kl_estimator="path", guidance_scale=case.guidance_scale, **case.train))
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    report = trainer.train()
    return case, trainer, before, report


def test_training_changes_the_denoiser_lora_and_moves_the_duals(trained):
    case, trainer, before, report = trained
    after = trainer._lora_params()
    assert before and all(k.startswith(case.block_prefixes) for k in before)
    assert sum(not torch.equal(before[k], after[k].detach()) for k in before) > 0
    violated, satisfied = trainer.duals.multipliers.tolist()
    assert violated > 0.5 and satisfied < 0.5
    assert trainer.history[0]["kl"] == 0.0 and report["kl"]["mean"] > 0.0
    assert report["kl"]["estimator"] == "path" and report["kl"]["units"] == "nats"


def test_saved_lora_reloads_with_the_diffusers_pipeline_class_and_reproduces_samples(trained, tmp_path):
    """The base saved as a folder, loaded by diffusers' own pipeline class (no cdalign), the
    LoRA by that class's ``load_lora_weights``: the trained model's images, not the base's."""
    import diffusers

    case, trainer, _, _ = trained
    out = trainer.output_dir
    family = family_of(trainer.pipe)
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith(f"{family.denoiser}.") for k in keys)
    base = load_pipeline(case.model_id)
    base.save_pretrained(tmp_path / "base")
    cls = getattr(diffusers, case.pipeline_class)
    fresh = cls.from_pretrained(str(tmp_path / "base"), **{n: None for n in family.absent_components(base)})
    assert type(fresh) is cls
    fresh.load_lora_weights(str(out))
    cfg = trainer.config
    ours = DiffusionSampler(fresh, cfg.num_inference_steps, cfg.eta, cfg.guidance_scale, cfg.resolution, "cpu")
    with torch.no_grad():
        reloaded = ours.sample(ours.guided(["a red circle"]), [11])
        trained_images = trainer.sampler.sample(trainer.sampler.guided(["a red circle"]), [11])
        base_images = ours.sample(WithAdaptersDisabled(ours.guided(["a red circle"])), [11])
    assert torch.allclose(reloaded, trained_images, atol=1e-5)
    assert not torch.allclose(reloaded, base_images, atol=1e-4)


def test_the_run_card_names_the_base_and_its_usage_snippet_runs(trained, monkeypatch):
    """The card's front matter (base model, text-to-image) and its Python snippet, run as
    written from the folder holding the run: the base by ``load_pipeline`` (embedded), the LoRA
    by the pipeline's ``load_lora_weights``, one image from diffusers' own pipeline call."""
    import re

    import yaml

    case, trainer, _, _ = trained
    text = (trainer.output_dir / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.S).group(1))
    assert meta["base_model"] == case.model_id and meta["pipeline_tag"] == "text-to-image"
    code = re.search(r"^```python\n(.*?)\n```$", text, re.S | re.M).group(1)
    assert "load_lora_weights" in code
    monkeypatch.chdir(trainer.output_dir.parent)
    namespace: dict = {}
    exec(compile(code.replace("num_inference_steps=6", "num_inference_steps=2"), "card", "exec"), namespace)
    assert type(namespace["pipe"]).__name__ == case.pipeline_class and namespace["image"].size[0] > 0


@pytest.mark.parametrize("name", CASES)
def test_policy_gradient_estimator_runs_on_the_family_chain(name, tmp_path):
    case = FAMILY_CASES[name]
    trainer = ConstrainedDDPOTrainer(tiny_config(
        tmp_path, pretrained_model_name_or_path=case.model_id, eta=0.7, estimator="policy_gradient",
        images_per_prompt=2, backprop_steps=4,  # the default; tiny_config's 2 is reward backprop's
        constraints=[{"reward": "jpeg_compressibility", "direction": "high", "threshold": 0.5}],
        max_steps=2, num_inference_steps=4, guidance_scale=case.guidance_scale,
    ))
    before = {k: v.detach().clone() for k, v in trainer._lora_params().items()}
    report = trainer.train()
    after = trainer._lora_params()
    assert sum(not torch.equal(before[k], after[k].detach()) for k in before) > 0
    assert report["estimator"]["name"] == "policy_gradient" and math.isfinite(report["kl"]["mean"])


# ----------------------------------------------------------------------------- evaluation
def _suite(case, run, **kw):
    from cdalign.evaluation import CheckpointSpec, EvaluationSuite

    return EvaluationSuite(name="family", model=case.model_id, prompts="shapes", num_prompts=2, rewards=["saturation"],
                           num_inference_steps=6, guidance_scale=case.guidance_scale, resolution=case.resolution,
                           batch_size=2, grid_images=0, constraints=[],
                           checkpoints=[CheckpointSpec("run", source=str(run))], **kw)


def test_evaluation_scores_a_checkpoint_with_its_kl(trained, tmp_path):
    from cdalign.evaluation.harness import evaluate

    case, trainer, _, _ = trained
    run = trainer.output_dir
    sde = evaluate(_suite(case, run, eta=0.7, kl_estimator="path"), tmp_path / "sde", progress=False)
    assert sde.checkpoints["run"]["kl"]["base"]["mean"] > 0 and sde.checkpoints["base"]["kl"]["base"]["mean"] == 0
    with pytest.raises(ValueError, match="eta: 0 samples deterministically.*kl_eta"):
        evaluate(_suite(case, run, eta=0.0, kl_estimator="path"), tmp_path / "ode0", progress=False)
    # ODE images, KL along an SDE pass with eta 0.7 from the same seeds: the SDE run's KL exactly
    ode = evaluate(_suite(case, run, eta=0.0, kl_eta=0.7, kl_estimator="path"), tmp_path / "ode", progress=False)
    assert ode.checkpoints["run"]["kl"]["base"]["mean"] == pytest.approx(sde.checkpoints["run"]["kl"]["base"]["mean"],
                                                                           rel=1e-6)
    assert ode.data["sampler"]["eta"] == 0.0 and ode.data["sampler"]["kl_eta"] == 0.7
    r_ode, r_sde = (r.checkpoints["run"]["rewards"]["saturation"]["mean"] for r in (ode, sde))
    assert r_ode != r_sde  # the images are the ODE's, not the SDE's
    assert "measured along a stochastic pass with eta 0.7" in (tmp_path / "ode" / "evaluation.md").read_text()


# ----------------------------------------------------------------------------- two processes
WORKER = Path(__file__).parent / "scripts" / "mp_worker.py"


@pytest.mark.parametrize("name", [n for n in CASES if FAMILY_CASES[n].two_processes])
def test_two_processes_agree_with_one_process(name, tmp_path):
    """2 gloo processes on the CPU (SDXL, FLUX: the denoiser sharded with FSDP2) against one
    plain process with the same global batch: the same λ, LoRA and KL."""
    case = FAMILY_CASES[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    flags = ["--model", case.model_id, "--eta", "0.7"]
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    for cmd, cwd in (([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(WORKER), str(two), "2", "2", *case.mp_flags, *flags], two),
                     ([sys.executable, str(WORKER), str(one), "4", "2", *flags], one)):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    m2, m1 = (json.loads((d / "rank0.json").read_text()) for d in (two, one))
    assert m2["world"] == 2 and m1["world"] == 1 and m2["sharded"] == ("--shard" in case.mp_flags)
    assert m2["multipliers"] == pytest.approx(m1["multipliers"], rel=1e-4, abs=1e-6)
    assert m2["report_kl"] == pytest.approx(m1["report_kl"], rel=1e-3, abs=1e-8)
    if not m2["sharded"]:  # a sharded run holds one shard per rank: no full LoRA to compare
        l2, l1 = (load_file(str(d / "rank0.safetensors")) for d in (two, one))
        for k in l1:
            rel = float((l2[k] - l1[k]).norm() / l1[k].norm().clamp(min=1e-12))
            assert rel < 2e-2, (k, rel)


FSDP_CONFIG = Path(__file__).parents[1] / "recipes" / "accelerate_configs" / "fsdp.yaml"


@pytest.mark.parametrize("name", [n for n in CASES if FAMILY_CASES[n].sharded_resume])
def test_sharded_run_resumes_exactly_from_its_checkpoint(name, tmp_path):
    """The denoiser sharded with FSDP2 (one unit per block of its family) in 2 processes, 3 steps
    with a checkpoint at step 2; the run resumed from checkpoint-2 in a fresh launch ends bitwise equal."""
    import shutil

    case = FAMILY_CASES[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes",
             "2", str(WORKER), str(out), "2", "3", "--model", case.model_id, "--eta", "0.7", "--save_steps", "2", *extra],
            cwd=out, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    launch(straight)
    shutil.copytree(straight / "run" / "checkpoint-2", resumed / "run" / "checkpoint-2")
    shutil.copytree(straight / "cache-2", resumed / "cache-2")
    launch(resumed, "--resume", str(resumed / "run" / "checkpoint-2"))
    meta_a, meta_b = (json.loads((d / "rank0.json").read_text()) for d in (straight, resumed))
    assert meta_a["sharded"] and meta_b["multipliers"] == meta_a["multipliers"]
    a, b = (load_file(str(d / "run" / "pytorch_lora_weights.safetensors")) for d in (straight, resumed))
    prefix = MODEL_FAMILIES.get(case.pipeline_class).denoiser + "."
    assert a.keys() == b.keys() and all(k.startswith(prefix) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- composition
@pytest.fixture(scope="module", params=CASES)
def loras(request, tmp_path_factory):
    case = FAMILY_CASES[request.param]
    root = tmp_path_factory.mktemp(f"{request.param}-loras")
    return case, [save_random_lora(case, root / "a", 1, 0.5), save_random_lora(case, root / "b", 2, 0.25)]


def test_composed_prediction_is_the_weighted_sum_of_component_predictions(loras):
    from cdalign.composition import Component, ComponentSet, load_lora_component
    from cdalign.models.adapters import set_denoiser_adapter

    case, paths = loras
    pipe = case.build(seed=0)
    for name, path in zip("ab", paths):
        load_lora_component(pipe, name, str(path))
    sampler = DiffusionSampler(pipe, 4, 0.7, case.guidance_scale, case.resolution, "cpu")
    prompts = ["a red circle", "a blue square"]
    comps = ComponentSet(sampler, [Component("a", "a"), Component("b", "b"), Component("base", None)])
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), sampler.chain.timesteps[1]
    with torch.no_grad(), CallCounter(denoiser(pipe)) as counter:
        composed = comps.composed(prompts, weights)(x, t)
    # one call per adapter; the unconditional rows only where the family uses CFG
    assert counter.rows == [2 * (2 if case.uses_cfg else 1)] * 3
    with torch.no_grad():
        singles = []
        for adapter in ("a", "b", None):
            set_denoiser_adapter(denoiser(pipe), adapter)
            singles.append(sampler.guided(prompts)(x, t))
    assert torch.allclose(composed, sum(float(w) * v for w, v in zip(weights, singles)), atol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


def test_and_composition_of_two_loras_end_to_end(loras, tmp_path):
    from cdalign.composition import ConstrainedComposer
    from cdalign.composition.config import config_from_dict

    case, paths = loras
    cfg = config_from_dict({
        "pretrained_model_name_or_path": case.model_id, "eta": 0.7, "resolution": case.resolution,
        "components": [{"name": "a", "source": str(paths[0])}, {"name": "b", "source": str(paths[1])}],
        "prompts": "shapes", "num_inference_steps": 4, "guidance_scale": case.guidance_scale,
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
    fresh = load_pipeline(case.model_id)
    fresh.load_lora_weights(str(tmp_path / "run" / "distilled"), adapter_name="distilled")
    assert "distilled" in denoiser(fresh).peft_config
