"""Run a small AND composition (dual ascent on μ + distillation) and dump μ per rank.

    compose_worker.py OUT LORA_A LORA_B DUAL_BATCH

Launched by tests/test_distributed.py with ``torchrun --nproc_per_node 2`` (gloo on CPU)
or as one plain process, with the same global batches (``DUAL_BATCH`` images per dual step
and 2 per distillation step, over all processes); writes ``OUT/rank<k>.json`` (learned and
per-step weights, the composed models' KLs, the distillation's record) from every rank."""

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402

from cdalign.composition import ConstrainedComposer  # noqa: E402
from cdalign.composition.composer import train_missing_components  # noqa: E402
from cdalign.composition.config import config_from_dict  # noqa: E402


def main(out: str, lora_a: str, lora_b: str, batch: int) -> None:
    acc = Accelerator(cpu=True)
    # a third component trained first, by the alignment trainer on the same accelerator: the
    # process group must outlive it (the composer's collectives come after)
    recipe = os.path.join(out, "trained_recipe.yaml")
    with open(recipe, "w") as f:
        f.write("objective: {type: reward, reward: brightness, normalize: false}\nconstraints: []\nprompts: shapes\n"
                "num_inference_steps: 4\nresolution: 32\nbackprop_steps: 1\nglobal_batch_size: 2\nmax_steps: 1\n"
                "eval_batches: 1\nnum_grid_images: 0\nguidance_scale: 3.0\n")
    cfg = config_from_dict({
        "components": [{"name": "a", "source": lora_a, "reward": "brightness"},
                       {"name": "b", "source": lora_b, "reward": "saturation"},
                       {"name": "c", "source": os.path.join(out, "trained"), "train_recipe": recipe},
                       {"name": "base", "kind": "base"}],
        "prompts": "shapes", "num_inference_steps": 4, "resolution": 32, "guidance_scale": 3.0,
        "dual": {"steps": 3, "batch_size": batch, "lr": 0.3, "normalize": True},
        "distill": {"enabled": True, "steps": 2, "batch_size": 2, "timesteps_per_chain": 2},
        "eval_batches": 1, "num_grid_images": 2,
        "output_dir": os.path.join(out, "run"), "overwrite_output_dir": True,
    })
    trained = train_missing_components(cfg, acc)
    report = ConstrainedComposer(cfg, accelerator=acc).run()
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as f:
        json.dump({"world": acc.num_processes, "trained": trained, "learned_weights": report["learned_weights"],
                   "dual_steps": report["dual_steps"], "models": {k: v["kl"] for k, v in report["models"].items()},
                   "distillation": report["distillation"]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
