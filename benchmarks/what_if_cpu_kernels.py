"""What-if: CPU kernel settings for the embedded tiny model's denoiser calls.

    python benchmarks/what_if_cpu_kernels.py [--threads 1] [--repeats 8] [--compile]
    python benchmarks/what_if_cpu_kernels.py --batch_sizes 1 2 4 8 16 32   # cost per image by call size
    python benchmarks/what_if_cpu_kernels.py --batch_sizes 2 8 16 --bf16   # and under bf16 autocast (AMX CPUs)
    python benchmarks/what_if_cpu_kernels.py --adapter_switch --repeats 50  # one adapter switch: diffusers vs cdalign

On the embedded ``cdalign/tiny-shapes-sd`` with a LoRA (r=4 on to_q/to_k/to_v/to_out.0, B made
non-zero), one guided denoiser call of 4 prompts (8 latents with CFG) as the sampler makes it
(:meth:`cdalign.core.sampling.DiffusionSampler.guided`): median wall time of a no-grad call and
of a call with a backward pass, in the default memory format, with the denoiser and its input in
``channels_last``, and (``--compile``) under ``torch.compile`` (the first, compiling call is
timed apart). Checks that every setting gives the default's prediction (max |difference|).
With ``--batch_sizes``: instead, the no-grad guided call (no LoRA) at each number of prompts, per
call and per image: whether fewer, larger calls would buy anything."""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch_sizes", type=int, nargs="+", help="time the no-grad call per image at these prompt counts")
    ap.add_argument("--bf16", action="store_true", help="with --batch_sizes: also under bf16 autocast, and its largest "
                    "difference from the fp32 prediction")
    ap.add_argument("--adapter_switch", action="store_true", help="time one adapter switch (3 LoRAs and the base in "
                    "turn) through diffusers' enable_adapters + set_adapters and through cdalign's set_denoiser_adapter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.batch_sizes:
        return per_image_cost(args)
    if args.adapter_switch:
        return adapter_switch_cost(args)
    from what_if_joint_call import add_random_lora  # benchmarks/, beside this script

    from cdalign.core.sampling import DiffusionSampler
    from cdalign.models.pipeline import load_pipeline

    pipe = load_pipeline("cdalign/tiny-shapes-sd")
    unet = pipe.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    add_random_lora(unet, g)
    sampler = DiffusionSampler(pipe, 10, 1.0, 3.0, None, "cpu")
    policy = sampler.guided(["a red circle on a white background", "a blue square on a black background",
                             "a green triangle on a gray background", "a yellow circle on a white background"])
    x = torch.randn(4, *sampler.latent_shape, generator=g)
    t = sampler.chain.timesteps[5]
    reference = policy(x, t).detach()

    def no_grad():
        with torch.no_grad():
            return policy(x, t)

    def with_backward():
        lora = [p for n, p in unet.named_parameters() if "lora" in n]
        for p in lora:
            p.requires_grad_(True)
        out = policy(x.clone().requires_grad_(True), t)
        out.square().mean().backward()
        for p in lora:
            p.grad = None
        return out

    rows = [("default (contiguous)", timed(no_grad, args.repeats), timed(with_backward, args.repeats), 0.0)]
    unet.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    diff = float((no_grad() - reference).abs().max())
    rows.append(("channels_last", timed(no_grad, args.repeats), timed(with_backward, args.repeats), diff))
    if args.compile:
        unet.to(memory_format=torch.contiguous_format)
        x = x.contiguous()
        pipe.unet.forward = torch.compile(unet.forward)
        t0 = time.perf_counter()
        no_grad()
        first = time.perf_counter() - t0
        diff = float((no_grad() - reference).abs().max())
        rows.append((f"torch.compile (first call {first:.1f} s)", timed(no_grad, args.repeats),
                     timed(with_backward, args.repeats), diff))
    base = rows[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} calls after a warm-up")
    print("| setting | no-grad call ms | call + backward ms | vs default (no-grad / backward) | max abs diff |")
    print("|---|---|---|---|---|")
    for name, a, b, d in rows:
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / base[1]:.2f} / {b / base[2]:.2f} | {d:.1e} |")


def per_image_cost(args) -> None:
    from cdalign.core.sampling import DiffusionSampler
    from cdalign.models.pipeline import load_pipeline

    pipe = load_pipeline("cdalign/tiny-shapes-sd")
    pipe.unet.requires_grad_(False)
    sampler = DiffusionSampler(pipe, 10, 1.0, 3.0, None, "cpu")
    prompts = ["a red circle on a white background", "a blue square on a black background",
               "a green triangle on a gray background", "a yellow circle on a white background"]
    t, g = sampler.chain.timesteps[5], torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} calls after a warm-up")
    bf16 = " bf16 ms per image | bf16 max abs diff (mean abs prediction) |" if args.bf16 else ""
    print("| prompts per call (latents with CFG) | no-grad call ms | ms per image |" + bf16)
    print("|---|---|---|" + ("---|---|" if args.bf16 else ""))
    for b in args.batch_sizes:
        policy = sampler.guided([prompts[i % len(prompts)] for i in range(b)])
        x = torch.randn(b, *sampler.latent_shape, generator=g)
        with torch.no_grad():
            ms = timed(lambda: policy(x, t), args.repeats) * 1e3
            row = f"| {b} ({2 * b}) | {ms:.1f} | {ms / b:.1f} |"
            if args.bf16:
                ref = policy(x, t)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    low = policy(x, t).float()
                    ms16 = timed(lambda: policy(x, t), args.repeats) * 1e3
                row += f" {ms16 / b:.1f} | {(low - ref).abs().max():.3g} ({ref.abs().mean():.3g}) |"
        print(row)


def adapter_switch_cost(args) -> None:
    """ms per switch over the cycle a, b, c, base, on each tiny model with three LoRAs: what a
    composition does once per component pass."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from cdalign.core.families import denoiser_of
    from cdalign.models.adapters import set_denoiser_adapter
    from cdalign.models.pipeline import load_pipeline

    def diffusers_switch(d, adapter):
        if adapter is None:
            d.disable_adapters()
        else:
            d.enable_adapters()
            d.set_adapters([adapter])

    cycle = ["a", "b", "c", None] * args.repeats
    print(f"torch {torch.__version__}, {args.threads} thread(s), {len(cycle)} switches")
    print("| model | modules | LoRA layers | diffusers ms per switch | cdalign ms per switch |")
    print("|---|---|---|---|---|")
    for model in ("cdalign/tiny-shapes-sd", "cdalign/tiny-shapes-sd3"):
        d = denoiser_of(load_pipeline(model)).requires_grad_(False)
        for a in "abc":
            d.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=a)
        row = []
        for switch in (diffusers_switch, set_denoiser_adapter):
            switch(d, "a")  # warm-up (cdalign: finds its layers)
            t0 = time.perf_counter()
            for adapter in cycle:
                switch(d, adapter)
            row.append((time.perf_counter() - t0) / len(cycle) * 1e3)
        layers = sum(isinstance(m, BaseTunerLayer) for m in d.modules())
        print(f"| {model} | {sum(1 for _ in d.modules())} | {layers} | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
