"""cdalign at Stable Diffusion 3.5-medium scale on a GPU (prepared; run it where a GPU is).

    python benchmarks/gpu_sd3.py --out $OUT            # on a GPU machine (one H100/H200: a few minutes)
    python benchmarks/gpu_sd3.py --tiny                # the same code at tiny shapes on the CPU (seconds)

Model: the *architecture* of stabilityai/stable-diffusion-3.5-medium with random weights, built
from the config dicts written below (no download): SD3Transformer2DModel (24 layers, 24 heads
x 64, patch 2, joint attention 4096, caption projection 1536, pooled projection 2048,
dual-attention layers 0..12, RMS q/k norm, pos-embed 384, sample size 128), its VAE
(16 latent channels, [128, 256, 512, 512], scaling 1.5305, shift 0.0609, no quant convs),
CLIP-L and CLIP-G text encoders with projections (768 + 1280 = 2048 pooled) over a
byte-level tokenizer (text encoding is not what is measured), FlowMatchEulerDiscreteScheduler
(shift 3). T5-XXL is left out by default (``text_encoder_3=None``, as diffusers allows: the
transformer then gets 256 zero T5 tokens, so its sequence length and cost are the same;
T5 would add one no-grad encode per batch and ~9.5 GB of bf16 weights); ``--t5`` adds a
random T5-XXL encoder (24 layers, d_model 4096, d_ff 10240, 64 heads, gated GELU).

Run: 1024x1024, bf16 (frozen weights bf16, LoRA fp32, autocast), LoRA r=4 alpha 4 on
to_q/to_k/to_v/to_out.0 (cdalign's default targets), batch 2 prompts per step, 28
flow-SDE steps (noise level eta 0.7, Flow-GRPO's), guidance 4.5, cdalign's gradient
checkpointing, gradient through the last K = 1 step(s) plus the VAE decode, reward =
saturation. Everything goes through cdalign's own code: ``ConstrainedDDPOTrainer.step`` for
the training rows (reward only; KL proximity constraint, value at every step) and the
trainer's ``DiffusionSampler`` for the sampling row (no gradient, CFG, VAE decode).
Reported: sampling s/image, training s/step (and per image), peak GPU memory of each.
A configuration that runs out of GPU memory is reported as OOM and the next one runs.

Results: a Markdown table on stdout, and ``gpu_sd3.json`` / ``gpu_sd3.md`` under ``--out``
(default ``$OUT`` if set, else the current directory), rewritten after every row."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gpu_common", Path(__file__).with_name("gpu_common.py"))
gpu_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_common)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (architecture fields)
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),  # 0..12
    qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-medium vae/config.json
SD35M_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    mid_block_add_attention=True,
)
# text_encoder (CLIP-L/14) and text_encoder_2 (OpenCLIP bigG/14), both CLIPTextModelWithProjection
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              projection_dim=1280, hidden_act="gelu")
# text_encoder_3 (T5 v1.1 XXL encoder), only with --t5
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              dropout_rate=0.0)
# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json
SD35M_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

FULL = dict(
    name="SD3.5-medium architecture", transformer=SD35M_TRANSFORMER, vae=SD35M_VAE, clip_l=CLIP_L, clip_g=CLIP_G,
    t5=T5_XXL, resolution=1024, batch=2, steps=28, ks=[1], kls=[False, True], eta=0.7, guidance=4.5,
    mixed_precision="bf16", timed=2, warmup=1, sample=True,
)
# --tiny: the same code at tiny shapes (CPU, seconds): every SD3.5-medium feature kept (dual
# attention, RMS q/k norm, 16 latent channels, two projected CLIPs whose pooled widths add
# up to pooled_projection_dim, CLIP widths padded into joint_attention_dim), sizes shrunk
TINY = dict(
    FULL,
    name="SMOKE: tiny shapes, not SD3.5-medium",
    transformer=dict(SD35M_TRANSFORMER, sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                     joint_attention_dim=128, caption_projection_dim=32, pooled_projection_dim=64,
                     pos_embed_max_size=16, dual_attention_layers=(0,)),
    vae=dict(SD35M_VAE, block_out_channels=[32, 32, 32, 32], sample_size=64),
    clip_l=dict(CLIP_L, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                projection_dim=32),
    clip_g=dict(CLIP_G, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                projection_dim=32),
    t5=dict(T5_XXL, d_model=128, d_ff=64, d_kv=8, num_heads=4, num_layers=1),
    resolution=64, batch=2, steps=3, timed=1, warmup=1,
)
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def _clip(tok, spec: dict):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec,
    ))


def build_pipeline(shape: dict, device: str = "cpu", t5: bool = False, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of ``shape``'s architecture with random weights (seeded),
    its networks initialised directly on ``device`` (fast on a GPU)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from cdalign.models.tiny import byte_level_clip_tokenizer

    tok, tok_2 = byte_level_clip_tokenizer(), byte_level_clip_tokenizer()
    tok_3 = byte_level_clip_tokenizer(model_max_length=256) if t5 else None  # the pipeline pads T5 to 256 tokens
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**shape["transformer"])
        vae = AutoencoderKL(**shape["vae"])
        text_encoder, text_encoder_2 = _clip(tok, shape["clip_l"]), _clip(tok_2, shape["clip_g"])
        text_encoder_3 = None
        if t5:
            from transformers import T5Config, T5EncoderModel

            assert shape["t5"]["d_model"] == shape["transformer"]["joint_attention_dim"]
            text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tok_3), pad_token_id=tok_3.pad_token_id,
                                                     eos_token_id=tok_3.eos_token_id, **shape["t5"]))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35M_SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tok_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reset_peak(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def make_trainer(pipe, k: int, kl: bool, shape: dict, output_dir: str):
    return gpu_common.benchmark_trainer(pipe, "sd3.5-medium-architecture-random", k, kl, shape, output_dir,
                                        prompts=PROMPTS, eta=shape["eta"], guidance_scale=shape["guidance"],
                                        resolution=shape["resolution"])


def _timed(fn, n: int, device) -> list[float]:
    times = []
    for _ in range(n):
        gpu_common.sync(device)
        t0 = time.perf_counter()
        fn()
        gpu_common.sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure_sampling(trainer, shape: dict, device) -> dict:
    """Seconds per batch of the trainer's own sampler (no gradient, CFG, VAE decode), under
    the trainer's autocast: the sampling half of a training step, on its own."""
    import torch

    sampler, prompts = trainer.sampler, (PROMPTS * shape["batch"])[: shape["batch"]]
    seeds = list(range(shape["batch"]))

    def sample():
        with torch.no_grad(), trainer.accelerator.autocast():
            images = sampler.sample(sampler.guided(prompts), seeds)
        assert images.shape == (len(seeds), 3, shape["resolution"], shape["resolution"])
        assert bool(torch.isfinite(images).all())

    _reset_peak(device)
    _timed(sample, shape["warmup"], device)
    times = _timed(sample, shape["timed"], device)
    s = statistics.median(times)
    return dict(row="sampling", kl=None, k=None, s=s, s_per_image=s / shape["batch"], peak_gpu_gib=_peak_gib(device),
                times=times)


def measure(shape: dict, device: str, t5: bool = False, on_row=None) -> dict:
    """Build the pipeline, then the sampling row and one training row per (KL, K);
    ``on_row(result)`` after each (the script rewrites its output files there)."""
    import torch

    t0 = time.perf_counter()
    pipe = build_pipeline(shape, device, t5=t5)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    res = {"build_s": time.perf_counter() - t0, "transformer_params": n_params, "t5": t5, "rows": []}
    sampled = not shape.get("sample", True)
    for kl in shape["kls"]:
        for k in shape["ks"]:
            gpu_common.remove_lora(pipe)
            with tempfile.TemporaryDirectory() as out:
                trainer = make_trainer(pipe, k, kl, shape, out)
                if not sampled:
                    sampled = True
                    try:
                        res["rows"].append(measure_sampling(trainer, shape, device))
                    except RuntimeError as err:
                        if not _is_oom(err):
                            raise
                        res["rows"].append(dict(row="sampling", kl=None, k=None, oom=True, peak_gpu_gib=_peak_gib(device)))
                    _log(res["rows"][-1])
                    if on_row:
                        on_row(res)
                row = dict(row="train", kl=kl, k=k)
                try:
                    _reset_peak(device)
                    logs = []
                    _timed(lambda: logs.append(trainer.step()), shape["warmup"], device)
                    times = _timed(lambda: logs.append(trainer.step()), shape["timed"], device)
                    assert all(torch.isfinite(torch.tensor(float(l["loss"]))) for l in logs), logs
                    s = statistics.median(times)
                    row.update(s=s, s_per_image=s / shape["batch"], peak_gpu_gib=_peak_gib(device), times=times,
                               loss=float(logs[-1]["loss"]), kl_value=float(logs[-1]["kl"]) if "kl" in logs[-1] else None)
                except RuntimeError as err:
                    if not _is_oom(err):
                        raise
                    row.update(oom=True, peak_gpu_gib=_peak_gib(device))
                trainer = None  # frees it before the next row (not `del`: the lambdas above name it)
            res["rows"].append(row)
            _log(row)
            if on_row:
                on_row(res)
    return res


def _log(row: dict) -> None:
    what = row["row"] if row["row"] == "sampling" else f"train K={row['k']} kl={row['kl']}"
    print(f"{what}: " + ("OOM" if row.get("oom") else f"{row['s']:.2f} s"), file=sys.stderr, flush=True)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render(res: dict, meta: dict) -> str:
    sh = meta["shape"]
    t5 = ("T5-XXL included (random, `--t5`)" if res.get("t5") else
          "T5 left out (`text_encoder_3=None`: 256 zero T5 tokens, same transformer sequence length)")
    lines = [
        f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['when']}; {sh['name']}, random weights "
        f"({_count(res['transformer_params'])} transformer parameters); {sh['resolution']}x{sh['resolution']}, "
        f"{sh['mixed_precision']}; {t5}; batch {sh['batch']}, {sh['steps']} flow-SDE steps (eta {sh['eta']}), "
        f"guidance {sh['guidance']}, LoRA r=4, cdalign gradient checkpointing; built in {res['build_s']:.0f} s",
        "",
        "| measurement | K (gradient steps) | s (median) | s / image | peak GPU memory GiB |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if r["row"] == "sampling":
            what = f"sampling (cdalign `DiffusionSampler`, no gradient, CFG, {sh['steps']} steps + VAE decode), s / batch"
            k = "—"
        else:
            what = "training step, " + ("KL constraint (value at all steps)" if r["kl"] else "reward only") + ", s / step"
            k = str(r["k"])
        peak = "n/a (CPU)" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.1f}"
        if r.get("oom"):
            lines.append(f"| {what} | {k} | OOM | OOM | {peak} (at the failure) |")
        else:
            lines.append(f"| {what} | {k} | {r['s']:.2f} | {r['s_per_image']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", "--smoke", dest="tiny", action="store_true",
                    help="tiny shapes on the CPU: checks the code path only")
    ap.add_argument("--t5", action="store_true", help="include a random T5-XXL text encoder (default: left out)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="gradient steps K to measure (default 1)")
    ap.add_argument("--batch", type=int, default=None, help="prompts per optimiser step (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 28)")
    ap.add_argument("--timed", type=int, default=None, help="timed repetitions per row (default 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 1)")
    ap.add_argument("--no-kl", action="store_true", help="skip the KL-constrained training row")
    ap.add_argument("--no-sample", action="store_true", help="skip the sampling row")
    args = ap.parse_args(argv)

    import datetime as dt

    import torch

    shape = dict(TINY if args.tiny else FULL)
    for key in ("ks", "batch", "steps", "timed", "warmup"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.no_kl:
        shape["kls"] = [False]
    if args.no_sample:
        shape["sample"] = False
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))  # OMP_NUM_THREADS=1 keeps it at 1
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: use --tiny for the CPU code-path check")
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
    meta = {"smoke": args.tiny, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": shape}
    args.out.mkdir(parents=True, exist_ok=True)

    def write(res):
        text = render(res, meta)
        (args.out / "gpu_sd3.json").write_text(json.dumps({"meta": meta, **res}, indent=2, default=str))
        (args.out / "gpu_sd3.md").write_text(text + "\n")
        return text

    res = measure(shape, device, t5=args.t5, on_row=write)
    print(write(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
