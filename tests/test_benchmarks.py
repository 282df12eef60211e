"""Every benchmark row's code path, one step at a tiny size (so CI catches breakage).

The trl row needs trl 0.23.1 in ``benchmarks/.venv-trl`` (created by
``benchmarks/bench_peers.py``); it is skipped when that environment is missing (as in CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SMALL = {"num_inference_steps": 4, "backprop_steps": 2, "batch_size": 2}
T, K = SMALL["num_inference_steps"], SMALL["backprop_steps"]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """The tiny pipeline at latent size 8 (16x16 images) and the prompt list, as
    ``bench_peers.build_model_dir`` writes them."""
    from cdalign.models.tiny import build_tiny_pipeline

    tb = _load("tinybench")
    path = tmp_path_factory.mktemp("tiny-bench-small")
    build_tiny_pipeline(seed=0, sample_size=8).save_pretrained(str(path))
    (path / tb.PROMPTS_FILE).write_text(json.dumps(["a red circle", "a blue square"]))
    return str(path)


@pytest.mark.parametrize("row", ["reward_only", "reward_only_gc", "kl_all_steps", "kl_all_steps_gc", "kl_sampled", "kl_sampled_gc"])
def test_cdalign_rows_step(row, small_model_dir, tmp_path):
    bench_step, tb = _load("bench_step"), _load("tinybench")
    trainer = bench_step.build_trainer(row, small_model_dir, str(tmp_path), SMALL)
    cfg = trainer.config
    assert (cfg.num_inference_steps, cfg.backprop_steps, cfg.train_batch_size) == (T, K, 2)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.guidance_scale, cfg.eta) == (4, 4, 5.0, 1.0)
    assert cfg.gradient_checkpointing == row.endswith("_gc")
    counter = tb.DenoiserCallCounter(trainer.pipe.unet)
    log = trainer.step()
    assert math.isfinite(log["loss"])
    assert counter.total >= T
    if row.startswith("reward_only"):
        assert counter.total - counter.recomputed == T  # one CFG-batched call per denoising step
    else:
        assert "kl" in log and counter.total > T  # base-model predictions for the chain KL
    assert (counter.recomputed > 0) == row.endswith("_gc")


@pytest.mark.parametrize(
    "kl,variant,calls",
    [
        (False, {}, T),
        (True, {}, 2 * T),
        (False, {"merged": True}, T),
        (True, {"kl_value_steps": 1, "base_grad": False}, T + K + 1),
    ],
)
def test_floor_step(kl, variant, calls, small_model_dir):
    floor, tb = _load("floor"), _load("tinybench")
    step = floor.FloorStep(small_model_dir, kl=kl, config=SMALL, **variant)
    before = [p.detach().clone() for p in step.params]
    counter = tb.DenoiserCallCounter(step.unet)
    step()
    assert counter.total == calls
    assert any(not torch.equal(a, p) for a, p in zip(before, step.params))  # the optimiser step happened
    if variant.get("merged"):  # unmerged again after the no-grad forwards
        assert not any(layer.merged for layer in step._lora_layers())


def test_floor_joint_call_gives_the_separate_calls_gradient_in_fewer_calls(small_model_dir):
    """--joint (policy and base in one mixed-adapter call per step) is the same step as the
    separate calls: the same LoRA gradient (to float rounding), in one call per step."""
    floor, tb = _load("floor"), _load("tinybench")
    grads, calls = {}, {}
    for joint in (False, True):
        step = floor.FloorStep(small_model_dir, kl=True, config=SMALL, kl_value_steps=1, joint=joint)
        with torch.no_grad():  # a non-zero LoRA, so the policy and the base differ
            for p in step.params:
                p.add_(0.05 * torch.randn_like(p))
        step.optimizer.step = lambda: grads.__setitem__(joint, [p.grad.clone() for p in step.params])
        counter = tb.DenoiserCallCounter(step.unet)
        step()
        calls[joint] = counter.total
    assert calls == {False: T + K + 1, True: T}  # value step and gradient steps share their calls
    flat = {j: torch.cat([g.flatten() for g in gs]) for j, gs in grads.items()}
    assert flat[False].abs().max() > 0
    assert torch.allclose(flat[True], flat[False], rtol=1e-4, atol=1e-4 * float(flat[False].abs().max()))
    with pytest.raises(ValueError, match="--joint"):
        floor.FloorStep(small_model_dir, kl=True, config=SMALL, joint=True, base_grad=False)


def test_research_kl_step(small_model_dir):
    research, tb = _load("peer_research_kl"), _load("tinybench")
    step = research.ResearchKLStep(small_model_dir, SMALL)
    counter = tb.DenoiserCallCounter(step.unet, step.ref_unet)
    out = step()
    assert math.isfinite(out["loss"]) and out["kl"] >= 0
    # policy + frozen copy at every step; recomputed in backward: K policy calls and the
    # K-1 copy calls whose input carries gradient
    assert counter.total == 2 * T + K + (K - 1)
    assert counter.recomputed == K + (K - 1)
    assert all(not p.requires_grad for p in step.ref_unet.parameters())


@pytest.mark.parametrize("row", ["compose_sample_2", "compose_dual_3", "distilled"])
def test_composition_rows(row, small_model_dir):
    comp, tb = _load("bench_composition"), _load("tinybench")
    step, unet, steps = comp.build(row, small_model_dir, SMALL)
    counter = tb.DenoiserCallCounter(unet)
    out = step()
    images = out[0] if isinstance(out, tuple) else out
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    kind, n = comp.ROWS[row]
    assert counter.total == steps * (1 if kind == "distilled" else n)


def test_trl_row_or_skip(small_model_dir):
    peers = _load("bench_peers")
    if not peers.trl_ready():
        pytest.skip("benchmarks/.venv-trl with trl 0.23.1 is missing (created by benchmarks/bench_peers.py)")
    cmd = peers.row_command("trl_alignprop", Path(small_model_dir), 1, 0, 1, [f"{k}={v}" for k, v in SMALL.items()])
    res = peers.run_child(cmd, timeout=300)
    assert res["trl_version"] == "0.23.1"
    assert res["unet_calls_per_step"] == T + K and res["unet_recomputed_per_step"] == K


def test_row_commands_and_overrides(small_model_dir):
    peers, tb = _load("bench_peers"), _load("tinybench")
    for row in list(peers.TRAIN_ROWS) + list(peers.COMPOSITION_ROWS):
        cmd = peers.row_command(row, Path(small_model_dir), 8, 2, 2)
        assert Path(cmd[1]).is_file(), cmd
        assert ("--steps" in cmd) and ("8" in cmd)
        assert cmd[0] == (str(peers.trl_python()) if row in ("trl_alignprop", "trl_ddpo") else sys.executable)
    assert tb.parse_overrides(["num_inference_steps=4"]) == {"num_inference_steps": 4}
    with pytest.raises(ValueError, match="unknown tiny-bench"):
        tb.parse_overrides(["num_steps=4"])


def test_render_table_and_targets():
    peers = _load("bench_peers")

    def res(row, rnd, s, rss, calls=20, rec=0):
        return {"row": row, "round": rnd, "median_s": s, "peak_rss_mb": rss,
                "unet_calls_per_step": calls, "unet_recomputed_per_step": rec}

    results = {
        "trl_alignprop": [res("trl_alignprop", 0, 4.0, 1000, 24, 4), res("trl_alignprop", 1, 5.0, 1000, 24, 4)],
        "research_kl": [res("research_kl", 0, 8.0, 1050, 47, 7), res("research_kl", 1, 10.0, 1050, 47, 7)],
        "reward_only": [res("reward_only", 0, 3.2, 1500), res("reward_only", 1, 4.0, 1500)],
        "kl_all_steps_gc": [res("kl_all_steps_gc", 0, 6.0, 1080, 47, 7), res("kl_all_steps_gc", 1, 7.5, 1080, 47, 7)],
        "floor": [res("floor", 0, 3.0, 1400), res("floor", 1, 3.8, 1400)],
        "distilled": [dict(res("distilled", 0, 1.0, 500), unet_calls_per_denoising_step=1, adapters=3)],
        "compose_sample_2": [dict(res("compose_sample_2", 0, 2.0, 500, 40), unet_calls_per_denoising_step=2, adapters=2)],
    }
    meta = {"machine": {"cpu": "cpu", "cores": 2, "torch": "x", "python": "3", "commit": "abc"}, "threads": 2,
            "started": "d", "finished": "e", "load_start": "1", "load_end": "1", "rounds": 2, "steps": 8, "warmup": 2,
            "comp_steps": 4, "comp_warmup": 1, "skipped": []}
    text = peers.render(results, meta)
    assert "cdalign reward-only <= 0.9 x trl AlignProp: 0.80 (rounds: 0.80 / 0.80) — **met**" in text
    assert "(all steps, gradient checkpointing) <= 1.2 x trl reward-only: 1.50" in text and "**NOT met**" in text
    assert "<= 0.65 x research-code KL: 0.75" in text
    assert "1080 MB vs 1000 MB (+8.0%) — **met**" in text
    assert "| composed model, 2 adapters, sampling | 2.00 | 2.00 (2.00) | 2 | 2 |" in text


def test_gpu_sd15_script_smoke_path():
    """The prepared GPU script's code path (cdalign trainer, SD 1.5 block layout) at tiny
    shapes on the CPU; the real run needs a GPU. fp32 here: accelerate's state is
    process-wide and the other tests already made it fp32 (``--smoke`` runs bf16)."""
    gpu = _load("gpu_sd15")
    shape = dict(gpu.SMOKE, steps=2, ks=[1], kls=[True], timed=1, warmup=0, matmul_n=64, mixed_precision="no")
    res = gpu.measure(shape, "cpu")
    assert [(r["kl"], r["k"]) for r in res["rows"]] == [(True, 1)]
    for r in res["rows"]:
        assert r["s_per_step"] > 0 and r["step_tflop"] > 0 and 0 < r["fraction_of_matmul_rate"]
    text = gpu.render(res, {"device_name": "CPU", "torch": torch.__version__, "when": "now", "smoke": True})
    assert "SMOKE" in text and "| yes (all steps) | 1 |" in text
    assert gpu.SD15_UNET["block_out_channels"] == [320, 640, 1280, 1280] and gpu.SD15_UNET["cross_attention_dim"] == 768


def test_round_schedule_brackets_every_row_with_the_reference():
    peers = _load("bench_peers")
    train = ["trl_alignprop", "a", "b", "c", "d", "e"]
    order = peers.round_schedule(train, ["distilled"], 0, 2)
    assert order == ["trl_alignprop", "a", "b", "trl_alignprop", "c", "d", "trl_alignprop", "e", "trl_alignprop", "distilled"]
    assert peers.round_schedule(train, [], 1, 0) == ["trl_alignprop", "b", "c", "d", "e", "a", "trl_alignprop"]
    # a row is compared with the mean of the reference runs just before and after it
    results = {
        "trl_alignprop": [{"round": 0, "seq": 1, "median_s": 4.0}, {"round": 0, "seq": 3, "median_s": 6.0},
                          {"round": 0, "seq": 5, "median_s": 100.0}],
        "a": [{"round": 0, "seq": 2, "median_s": 4.5}],
    }
    assert peers._ratios(results, "a", "trl_alignprop") == [0.9]


def test_flop_counts_in_reproduce_md_are_what_the_counting_script_prints():
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/flops_sd15.py"], cwd=root, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    unet, vae = (float(x) for x in re.findall(r"\| ([\d.]+) \|", out))
    doc = (root / "docs" / "REPRODUCE.md").read_text()
    assert f"**C = {unet:.2f} TFLOP**" in doc and f"**D = {vae:.2f} TFLOP**" in doc


# ----------------------------------------------------------------------------- flow-matching transformer (SD3)
@pytest.fixture(scope="module")
def small_sd3_model_dir(tmp_path_factory):
    """The tiny SD3 pipeline at latent size 8 (16x16 images), as ``bench_step.build_model``
    saves it (at latent size 32 there)."""
    from cdalign.models.tiny import build_tiny_sd3_pipeline

    tb = _load("tinybench")
    path = tmp_path_factory.mktemp("tiny-bench-sd3-small")
    build_tiny_sd3_pipeline(seed=0, sample_size=8).save_pretrained(str(path))
    (path / tb.PROMPTS_FILE).write_text(json.dumps(["a red circle", "a blue square"]))
    return str(path)


@pytest.mark.parametrize("row", ["reward_only", "kl_all_steps", "kl_sampled_gc", "pg_kl_trained"])
def test_cdalign_rows_step_on_the_tiny_sd3_transformer(row, small_sd3_model_dir, tmp_path):
    bench_step, tb = _load("bench_step"), _load("tinybench")
    trainer = bench_step.build_trainer(row, small_sd3_model_dir, str(tmp_path), SMALL, model="sd3")
    assert type(trainer.pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(trainer.denoiser).__name__ == "SD3Transformer2DModel"
    assert trainer.config.eta == 0.7 and trainer.config.num_inference_steps == T  # the flow SDE's noise level
    counter = tb.DenoiserCallCounter(trainer.denoiser)
    log = trainer.step()
    assert math.isfinite(log["loss"])
    if row == "reward_only":
        assert counter.total == T  # one CFG-batched transformer call per denoising step
    else:
        assert "kl" in log and counter.total > T
    assert (counter.recomputed > 0) == row.endswith("_gc")
    assert bench_step.row_label(row, "sd3").startswith("tiny SD3 (flow-matching transformer")
    assert bench_step.row_label(row, "sd") == bench_step.ROWS[row]["label"]


def test_gpu_sd3_script_smoke_path():
    """The prepared SD3.5-medium GPU script's code path (cdalign trainer and sampler on an
    SD3 transformer with dual attention and RMS q/k norm, 16 latent channels, two projected
    CLIPs) at tiny shapes on the CPU; the real run needs a GPU. fp32 here for the reason
    given in the SD 1.5 test above (``--tiny`` runs bf16)."""
    gpu = _load("gpu_sd3")
    shape = dict(gpu.TINY, steps=2, ks=[1], kls=[True], timed=1, warmup=0, mixed_precision="no")
    seen = []
    res = gpu.measure(shape, "cpu", on_row=lambda r: seen.append(len(r["rows"])))
    assert [(r["row"], r["kl"], r["k"]) for r in res["rows"]] == [("sampling", None, None), ("train", True, 1)]
    assert seen == [1, 2]  # the output files are rewritten after every row
    for r in res["rows"]:
        assert r["s"] > 0 and not r.get("oom")
    assert math.isfinite(res["rows"][1]["loss"]) and res["rows"][1]["kl_value"] is not None
    meta = {"device_name": "CPU", "torch": torch.__version__, "when": "now", "smoke": True, "shape": shape}
    text = gpu.render(res, meta)
    assert "SMOKE" in text and "T5 left out" in text
    assert "| training step, KL constraint (value at all steps), s / step | 1 |" in text
    full = gpu.SD35M_TRANSFORMER
    assert (full["num_layers"], full["num_attention_heads"], full["attention_head_dim"]) == (24, 24, 64)
    assert (full["joint_attention_dim"], full["caption_projection_dim"], full["pooled_projection_dim"]) == (4096, 1536, 2048)
    assert full["dual_attention_layers"] == tuple(range(13)) and full["qk_norm"] == "rms_norm"
    assert gpu.CLIP_L["projection_dim"] + gpu.CLIP_G["projection_dim"] == full["pooled_projection_dim"]
    assert (gpu.SD35M_VAE["latent_channels"], gpu.SD35M_VAE["scaling_factor"], gpu.SD35M_VAE["shift_factor"]) == (16, 1.5305, 0.0609)
    assert gpu.FULL["resolution"] == 1024 and gpu.FULL["mixed_precision"] == "bf16"


def test_pretrain_step_benchmark_prints_both_rows():
    """benchmarks/bench_pretrain_step.py times the flow pretraining step with the pipeline's
    full context and with the one weighted zero token, and prints both rows."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pretrain_step.py"
    proc = subprocess.run([sys.executable, str(script), "--batch_size", "2", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "context |" not in line]
    assert len(rows) == 2 and "77 + 256" in rows[0] and "77 + 1" in rows[1]
    assert rows[0].endswith("| 1.00x |")


def test_score_function_gradient_benchmark_measures_every_row_against_the_pathwise_reference(tmp_path, capsys):
    """benchmarks/score_function_gradient.py on the tiny random model: one line per row, the
    reference against itself at cosine and projection 1."""
    import yaml

    recipe = {"pretrained_model_name_or_path": "cdalign/tiny-random-sd", "prompts": "shapes",
              "normalization_cache_dir": str(tmp_path / "cache"), "objective": {"type": "kl"},
              "constraints": [{"reward": "brightness", "direction": "high", "threshold": 5.0}],
              "num_inference_steps": 4, "backprop_steps": 2, "resolution": 32, "train_batch_size": 2,
              "normalization_batches": 2}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    bench = _load("score_function_gradient")
    assert bench.main(["--config", str(tmp_path / "recipe.yaml"), "--constraint", "0", "--micro_batches", "2",
                       "--advantages", "leave_one_out"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:34].strip(): line[34:].split() for line in lines[2:]}
    assert list(rows) == ["pathwise, every step", "pathwise, last 2 steps", "hybrid (leave_one_out)",
                          "score_function (leave_one_out)"]
    assert rows["pathwise, every step"][:3] == ["1.000", "1.000", "1.00"]
    assert all(math.isfinite(float(v)) for cells in rows.values() for v in cells)


def test_fidelity_floor_runs_every_floor_on_every_seed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # it imports its sibling frontier.py
    bench = _load("fidelity_floor")
    runs = bench.configs_for("flow", tmp_path, [4.0], [0.2, 0.1], seeds=(0, 1))
    assert set(runs) == {"no_floor", "floor", "floor_seed1", "kl_x4"}
    assert [runs[n].seed for n in ("floor", "floor_seed1", "no_floor", "kl_x4")] == [0, 1, 0, 0]
    assert runs["floor_seed1"].output_dir == str(tmp_path / "flow" / "floor_seed1")
    assert runs["kl_x4"].dual.freeze and runs["kl_x4"].dual.init == [0.05, 0.025]
    variant = bench._variant(runs["floor"], {"kl_grad_steps": "all", "floor_gradient": "score_function"})
    assert variant.kl_grad_steps == "all"
    assert [c.gradient for c in variant.constraints] == ["backprop", "backprop", "score_function"]  # the floor's alone


def test_cpu_kernel_call_sizes_with_bf16_print_one_row_per_size(capsys, monkeypatch):
    """``what_if_cpu_kernels.py --batch_sizes ... --bf16``: a row per call size with the fp32 and
    bf16 cost per image and bf16's largest difference from the fp32 prediction (small but not 0)."""
    bench = _load("what_if_cpu_kernels")
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["what_if_cpu_kernels.py", "--batch_sizes", "1", "2", "--bf16", "--repeats", "1",
                                      "--threads", str(threads)])
    bench.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split()[1] for r in rows] == ["1", "2"]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert all(len(c) == 5 for c in cells)
    diff = float(cells[0][4].split()[0])
    assert 0 < diff < 0.5


def test_adapter_switch_timing_prints_both_tiny_models(capsys, monkeypatch):
    """``what_if_cpu_kernels.py --adapter_switch``: a row per tiny model with its module and LoRA
    layer counts and the time of one switch through diffusers and through cdalign."""
    bench = _load("what_if_cpu_kernels")
    monkeypatch.setattr(sys, "argv", ["what_if_cpu_kernels.py", "--adapter_switch", "--repeats", "1",
                                      "--threads", str(torch.get_num_threads())])
    bench.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cdalign/")]
    assert [r.split()[1] for r in rows] == ["cdalign/tiny-shapes-sd", "cdalign/tiny-shapes-sd3"]
    for r in rows:
        modules, layers, *times = (float(c) for c in r.strip("|").split("|")[1:])
        assert modules > layers > 0 and all(t > 0 for t in times)


def test_caption_mix_reweights_the_held_out_values_to_the_training_prompts(tmp_path, capsys):
    """Per-image values whose paired difference is 1.0 where the caption names no background and
    0.0 where it names one: the held-out mix reads the held-out share of unnamed captions, the
    training mix the training share (numbers from the prompt sets, counted here independently)."""
    from safetensors.numpy import save_file

    from cdalign.data.prompt_sets import load_prompts

    cm = _load("caption_mix")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("prompts: shapes_world\neval_prompts: shapes_eval\n")
    held_out, training = load_prompts("shapes_eval"), load_prompts("shapes_world")
    unnamed = np.array([" background" not in held_out[k % len(held_out)] for k in range(48)])
    base = np.linspace(-1, 1, 48).astype(np.float32)
    save_file({"base/brightness_high": base, "aligned/brightness_high": base + unnamed.astype(np.float32)},
              str(run / "eval_values.safetensors"))
    assert cm.main([str(run)]) == 0
    out = capsys.readouterr().out
    share_held_out = unnamed.mean()
    share_training = np.mean([" background" not in p for p in training])
    assert 0.2 < share_training < 0.3 and share_held_out == pytest.approx(0.5)
    held_line = next(line for line in out.splitlines() if "held-out mix" in line)
    train_line = next(line for line in out.splitlines() if "training mix" in line)
    assert f"run − base {share_held_out:+.2f}" in held_line
    assert f"run − base {share_training:+.2f}" in train_line
    assert cm.main([str(run), "--value", "nope"]) == 2
    # an accuracy is NaN where the caption names nothing to read: those images are left out, not averaged in
    with_nan = (base + unnamed).astype(np.float32)
    with_nan[unnamed] = np.nan
    save_file({"base/acc": base, "aligned/acc": with_nan}, str(run / "eval_values.safetensors"))
    assert cm.main([str(run), "--value", "acc"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "run − base +0.00" in next(line for line in out.splitlines() if "held-out mix" in line)


def test_log_windows_averages_each_block_and_keeps_its_last_multipliers(tmp_path, capsys):
    lw = _load("log_windows")
    rows = [{"step": s, "kl": float(s), "dual/b": 10.0 * s} for s in range(1, 8)]
    rows[5].pop("kl")  # a value missing from one row of a block: no mean for that block
    assert lw.windows(rows, ["kl"], 3) == [
        {"first": 1, "last": 3, "kl": 2.0, "dual/b": 30.0},
        {"first": 4, "last": 6, "kl": None, "dual/b": 60.0},
        {"first": 7, "last": 7, "kl": 7.0, "dual/b": 70.0},
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert lw.main([str(run), "--window", "3", "--keys", "kl"]) == 0
    assert "steps   1-3    kl +2.000  | λ b 30.00" in capsys.readouterr().out
    assert lw.main([str(tmp_path), "--keys", "kl"]) == 2
