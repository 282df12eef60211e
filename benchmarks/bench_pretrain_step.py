"""One pretraining step of the tiny flow transformer (recipes/pretrain_tiny.py, architecture
sd3; cdalign.models.pretraining_sd3): forward and backward on the pipeline's full prompt embedding (77 CLIP + 256 zero T5 tokens)
against one zero token weighted 256 in attention (RepeatedContextTokenAttention). Prints a table.

    python benchmarks/bench_pretrain_step.py [--threads 1] [--batch_size 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def seconds_per_step(model, x, embeds, pooled, t, repeats: int) -> float:
    """Median wall seconds of one forward + backward (one warm-up call first)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(x, embeds, pooled, t).sample.pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusion3Pipeline

    from cdalign.models.pretraining_sd3 import RepeatedContextTokenAttention, t5_placeholder_tokens
    from cdalign.models.tiny_pretrained import build_untrained_sd3_components

    pipe = StableDiffusion3Pipeline(text_encoder_3=None, tokenizer_3=None, **build_untrained_sd3_components(seed=0, patch_size=1))
    captions = ["a large red square on a white background"] * args.batch_size
    full, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
    short, _, _, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False, max_sequence_length=1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 4, 16, 16, generator=generator)
    t = 1000 * torch.rand(args.batch_size, generator=generator)
    collapsed = copy.deepcopy(pipe.transformer)
    collapsed.set_attn_processor(RepeatedContextTokenAttention(t5_placeholder_tokens(pipe)))
    rows = [
        ("diffusers' processors, 77 + 256 context tokens", seconds_per_step(pipe.transformer, x, full, pooled, t, args.repeats)),
        ("RepeatedContextTokenAttention, 77 + 1 tokens", seconds_per_step(collapsed, x, short, pooled, t, args.repeats)),
    ]
    print(f"tiny SD3 transformer (pretrain_tiny_sd3.yaml shape), batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| context | s / forward+backward | ratio |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {rows[0][1] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
