"""What-if: the KL's base-model prediction in the same UNet call as the policy's.

    python benchmarks/what_if_joint_call.py [--threads 1] [--repeats 6]

On the tiny-bench pipeline with a LoRA (r=4 on to_q/to_k/to_v/to_out.0, B made non-zero),
at one denoising step with CFG (4 prompts -> 8 latents per call): the policy and the base
prediction from two calls (adapters switched off for the second, as cdalign does) against
one call of twice the batch in which peft's per-sample adapter routing (the LoRA layers'
``adapter_names`` argument, ``"__base__"`` for the base half) applies the LoRA to the first
half only. Checks that both give the same values and gradients, then prints the median time
of each, without and with a backward pass through both predictions."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


@contextlib.contextmanager
def mixed_adapter_batch(unet, adapter_names):
    from peft.tuners.tuners_utils import BaseTunerLayer

    def add_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    handles = [m.register_forward_pre_hook(add_names, with_kwargs=True) for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def add_random_lora(unet, generator: torch.Generator) -> None:
    """A rank-4 LoRA on the attention projections with B drawn N(0, 0.05²), so the adapter changes
    the prediction (a fresh LoRA's B is zero); the what-if benchmarks time calls through it."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=generator)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from cdalign.core.sampling import DiffusionSampler
    from cdalign.models.adapters import WithAdaptersDisabled
    from cdalign.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    unet = pipe.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    add_random_lora(unet, g)
    sampler = DiffusionSampler(pipe, 20, 1.0, 5.0, None, "cpu")
    policy = sampler.guided(["a red circle", "a blue square", "a green triangle", "a yellow circle"])
    base = WithAdaptersDisabled(policy)
    x = torch.randn(4, *sampler.latent_shape, generator=g)
    t = sampler.chain.timesteps[10]
    index = sampler.chain.index_of(t)

    def joint(x_t):
        n = 2 * len(x_t)
        x_in = torch.cat([x_t] * 4)
        embeds = torch.cat([policy.cond.embeds, policy.cond.embeds])
        with mixed_adapter_batch(unet, ["default"] * n + ["__base__"] * n):
            out = unet(x_in, t, encoder_hidden_states=embeds).sample
        results = []
        for half in out.chunk(2):
            u, c = half.chunk(2)
            results.append(sampler.chain.to_epsilon(index, x_t, u + policy.guidance_scale * (c - u)))
        return results

    def separate(x_t):
        return policy(x_t, t), base(x_t, t)

    trainable = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():
        (a, b), (ja, jb) = separate(x), joint(x)
    value_diff = max(float((a - ja).abs().max()), float((b - jb).abs().max()))
    grads = []
    for fn in (separate, joint):
        xg = x.clone().requires_grad_(True)
        p_, b_ = fn(xg)
        grads.append(torch.autograd.grad((p_ - b_).pow(2).sum(), [xg, *trainable]))
    grad_diff = max(float((u - v).abs().max() / v.abs().max().clamp(min=1e-12)) for u, v in zip(*grads))

    def timed(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def with_backward(fn):
        def run():
            xg = x.clone().requires_grad_(True)
            p_, b_ = fn(xg)
            (p_ - b_).pow(2).sum().backward()

        return run

    with torch.no_grad():
        rows = [("no grad", timed(lambda: separate(x)), timed(lambda: joint(x)))]
    rows.append(("forward + backward", timed(with_backward(separate)), timed(with_backward(joint))))
    print(f"values: max |difference| {value_diff:.1e}; gradients: max relative difference {grad_diff:.1e}")
    print(f"torch threads {args.threads}, median of {args.repeats}")
    print("| pass | two calls (policy, then base) ms | one call, batch doubled ms | ratio |")
    print("|---|---|---|---|")
    for name, two, one in rows:
        print(f"| {name} | {two:.0f} | {one:.0f} | {one / two:.2f} |")


if __name__ == "__main__":
    main()
