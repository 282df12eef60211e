"""Run a few trainer steps on the tiny pipeline and dump λ and the LoRA per rank.

Launched by tests/test_distributed.py with ``torchrun --nproc_per_node N`` (gloo on CPU)
or as one plain process; writes ``<out>/rank<k>.json`` and ``<out>/rank<k>.safetensors``.

    mp_worker.py OUT BATCH_PER_PROCESS STEPS [--shard] [--save_steps N] [--resume CHECKPOINT] [--mixed_precision bf16]
                 [--model cdalign/tiny-random-sd3] [--eta 0.7]

``--shard`` shards the denoiser with FSDP2 (``shard_denoiser=True``); ``--resume`` continues the run
in ``OUT/run`` from a checkpoint of it."""

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402

from cdalign import ConstrainedDDPOTrainer  # noqa: E402
from cdalign.alignment.config import config_from_dict  # noqa: E402
from cdalign.runs import distributed  # noqa: E402


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo process group (Linux)."""
    tasks = "/proc/self/task"
    names = [open(os.path.join(tasks, t, "comm")).read().strip() for t in os.listdir(tasks)]
    return sorted(n for n in names if "gloo" in n)


def main(out: str, batch_per_process: int, steps: int, shard: bool, save_steps: int, resume: str | None,
         mixed_precision: str = "no", model: str = "cdalign/tiny-random-sd", eta: float = 1.0) -> None:
    state = distributed.process_state(600)  # one gloo group on the CPU; the trainer makes (and ends) its accelerator
    cfg = config_from_dict(
        dict(
            pretrained_model_name_or_path=model,
            eta=eta,
            prompts="shapes",
            output_dir=os.path.join(out, "run"),
            normalization_cache_dir=os.path.join(out, f"cache-{state.num_processes}"),
            objective={"type": "kl"},
            constraints=[
                {"reward": "saturation", "direction": "high", "threshold": 1.0},
                {"reward": "local_contrast", "direction": "low", "threshold": -0.5},
            ],
            dual={"optimizer": "ascent", "lr": 0.5, "init": 0.2},
            num_inference_steps=4,
            backprop_steps=2,
            resolution=32,
            train_batch_size=batch_per_process,
            gradient_accumulation_steps=2,
            max_steps=steps,
            normalization_batches=2,
            eval_batches=1,
            num_grid_images=2,
            learning_rate=1e-2,
            mixed_precision=mixed_precision,
            overwrite_output_dir=resume is None,
            save_steps=save_steps,
            resume_from_checkpoint=resume,
        )
    )
    trainer = ConstrainedDDPOTrainer(cfg, shard_denoiser=True if shard else None)  # None: follow accelerate
    acc = trainer.accelerator
    report = trainer.train()
    rank = acc.process_index
    if not trainer.sharded:  # each rank's own copy (a sharded UNet holds one shard per rank;
        # train() has ended the process group, so shards cannot be gathered here: the test
        # compares the LoRA file the main process wrote)
        save_file(trainer.lora_state(), os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "gloo_threads_after_train": gloo_threads(),
                "world": acc.num_processes,
                "sharded": trainer.sharded,
                "multipliers": trainer.duals.multipliers.tolist(),
                "normalization": {n: s.__dict__ for n, s in trainer.normalizers.items()},
                "report_kl": report["kl"]["mean"],
                "history": trainer.history,
            },
            f,
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("batch_per_process", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--shard", action="store_true")
    ap.add_argument("--save_steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--mixed_precision", default="no")
    ap.add_argument("--model", default="cdalign/tiny-random-sd")
    ap.add_argument("--eta", type=float, default=1.0)
    a = ap.parse_args()
    main(a.out, a.batch_per_process, a.steps, a.shard, a.save_steps, a.resume, a.mixed_precision, a.model, a.eta)
