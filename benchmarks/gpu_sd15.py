"""cdalign's training step at Stable Diffusion 1.5 scale on a GPU (prepared; run it where a GPU is).

    python benchmarks/gpu_sd15.py --out results/          # on a GPU machine (~5-8 min on one H100)
    python benchmarks/gpu_sd15.py --smoke                 # tiny shapes on the CPU: checks the code path

Model: SD 1.5's UNet and VAE *architectures* with random weights, built from the config
dicts written below (no download); a one-layer CLIP text encoder of width 768 with a
byte-level tokenizer (text encoding is not what is measured). 512x512, bf16 (frozen
weights bf16, LoRA fp32, autocast), LoRA r=4 alpha 4 on to_q/to_k/to_v/to_out.0, batch
4, 50 DDIM steps (eta 1, guidance 5), gradient checkpointing, reward = saturation.
For K = 1..5 gradient steps, with and without the KL proximity constraint (value at
every step): seconds per optimiser step (median), images/s, peak GPU memory, the FLOPs
of one step (``torch.utils.flop_counter``, recomputation included) and their rate as a
fraction of this GPU's measured dense bf16 matmul rate.

Results: a Markdown table on stdout, and ``gpu_sd15.json`` / ``gpu_sd15.md`` under
``--out`` (default ``$OUT`` if set, else the current directory)."""

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

# stable-diffusion-v1-5 unet/config.json (architecture fields)
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# stable-diffusion-v1-5 vae/config.json
SD15_VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    scaling_factor=0.18215,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
# stable-diffusion-v1-5 scheduler (DDIM with SD's training schedule)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)

FULL = dict(unet=SD15_UNET, vae=SD15_VAE, text_hidden=768, batch=4, steps=50, ks=[1, 2, 3, 4, 5],
            mixed_precision="bf16", timed=3, warmup=1, matmul_n=8192)
# --smoke: the same code path at tiny shapes (CPU, a minute)
SMOKE = dict(
    unet=dict(SD15_UNET, block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, sample_size=8, attention_head_dim=4),
    vae=dict(SD15_VAE, block_out_channels=[32, 32, 32, 32], sample_size=64),
    text_hidden=32, batch=2, steps=4, ks=[1, 2], mixed_precision="bf16", timed=1, warmup=1, matmul_n=256,
)


def build_pipeline(shape: dict, seed: int = 0):
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from cdalign.models.tiny import byte_level_clip_tokenizer

    tok = byte_level_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**shape["unet"])
        vae = AutoencoderKL(**shape["vae"])
        h = shape["text_hidden"]
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=h, intermediate_size=h, num_attention_heads=max(1, h // 64) if h >= 64 else 4,
            num_hidden_layers=1, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=h,
        ))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def matmul_rate(device, dtype, n: int, repeats: int = 10) -> float:
    """Measured dense matmul rate, FLOP/s (n x n @ n x n)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    gpu_common.sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    gpu_common.sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def make_trainer(pipe, k: int, kl: bool, shape: dict, output_dir: str):
    return gpu_common.benchmark_trainer(pipe, "sd15-architecture-random", k, kl, shape, output_dir,
                                        prompts="shapes", eta=1.0, guidance_scale=5.0)


def step_flops(trainer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.step()
    return float(counter.get_total_flops())


def measure(shape: dict, device: str) -> dict:
    import torch

    rate = matmul_rate(device, torch.bfloat16, shape["matmul_n"])
    pipe = build_pipeline(shape)
    rows = []
    for kl in shape.get("kls", (False, True)):
        for k in shape["ks"]:
            gpu_common.remove_lora(pipe)
            pipe.unet.to(torch.float32)  # the trainer casts frozen weights to bf16 itself
            with tempfile.TemporaryDirectory() as out:
                trainer = make_trainer(pipe, k, kl, shape, out)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(shape["warmup"]):
                    trainer.step()
                times = []
                for _ in range(shape["timed"]):
                    gpu_common.sync(device)
                    t0 = time.perf_counter()
                    trainer.step()
                    gpu_common.sync(device)
                    times.append(time.perf_counter() - t0)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
                flops = step_flops(trainer)
            s = statistics.median(times)
            rows.append(dict(kl=kl, k=k, s_per_step=s, images_per_s=shape["batch"] / s, peak_gpu_gib=peak,
                             step_tflop=flops / 1e12, achieved_tflops=flops / s / 1e12,
                             fraction_of_matmul_rate=flops / s / rate, times=times))
            print(f"K={k} kl={kl}: {s:.2f} s/step", file=sys.stderr, flush=True)
    return {"matmul_bf16_tflops": rate / 1e12, "rows": rows}


def render(res: dict, meta: dict) -> str:
    lines = [f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['when']}; "
             f"measured dense bf16 matmul rate {res['matmul_bf16_tflops']:.1f} TFLOP/s" + (" (SMOKE: tiny shapes, not SD 1.5)" if meta["smoke"] else ""),
             "",
             "| KL constraint | K | s / optimiser step | images / s | peak GPU memory GiB | TFLOP / step | fraction of bf16 matmul rate |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        peak = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {'yes (all steps)' if r['kl'] else 'no'} | {r['k']} | {r['s_per_step']:.2f} | {r['images_per_s']:.3f} | "
                     f"{peak} | {r['step_tflop']:.3g} | {r['fraction_of_matmul_rate']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the code path only)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="gradient steps K to measure (default 1..5)")
    ap.add_argument("--timed", type=int, default=None, help="timed steps per configuration (default 3)")
    args = ap.parse_args(argv)

    import datetime as dt

    import torch

    shape = dict(SMOKE if args.smoke else FULL)
    if args.ks:
        shape["ks"] = args.ks
    if args.timed:
        shape["timed"] = args.timed
    if args.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: use --smoke for the CPU code-path check")
        device = "cuda"
    meta = {"smoke": args.smoke, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": {k: v for k, v in shape.items()}}
    res = measure(shape, device)
    text = render(res, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_sd15.json").write_text(json.dumps({"meta": meta, **res}, indent=2, default=str))
    (args.out / "gpu_sd15.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
