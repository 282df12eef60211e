"""A few policy-gradient rounds on the tiny pipeline, for tests/test_policy_gradient_runs.py.

    pg_worker.py OUT BATCH_PER_PROCESS STEPS [--advantage KIND] [--high REWARD] [--save_steps N]
                 [--hang-after-checkpoint N] [--resume]

Run as one process or under ``torchrun --nproc_per_node N`` (gloo on CPU); writes
``OUT/rank<k>.json`` (λ, history, report numbers) and ``OUT/rank<k>.safetensors`` (LoRA).
``--hang-after-checkpoint N`` prints CHECKPOINTED after writing checkpoint-N and sleeps
(the test SIGKILLs it there); ``--resume`` continues ``OUT/run`` from its latest checkpoint."""

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cdalign import ConstrainedDDPOTrainer  # noqa: E402
from cdalign.alignment.config import config_from_dict  # noqa: E402


def main(a) -> None:
    acc = Accelerator(cpu=True)
    cfg = config_from_dict(
        dict(
            pretrained_model_name_or_path="cdalign/tiny-random-sd",
            prompts="shapes",
            output_dir=os.path.join(a.out, "run"),
            normalization_cache_dir=os.path.join(a.out, f"cache-{acc.num_processes}"),
            estimator="policy_gradient",
            objective={"type": "kl"},
            constraints=[
                {"reward": a.high, "direction": "high", "threshold": 1.0},
                {"reward": "saturation", "direction": "low", "threshold": -0.5},
            ],
            dual={"optimizer": "nupi", "kappa_i": 0.5, "kappa_p": 0.5, "nu": 0.5, "init": 0.2},
            images_per_prompt=2,
            advantage=a.advantage,
            prompt_tracker_min_count=2,
            ppo_epochs=2,
            ppo_updates_per_epoch=2,
            timestep_fraction=0.67,
            num_inference_steps=3,
            resolution=32,
            train_batch_size=a.batch_per_process,
            gradient_accumulation_steps=2,
            max_steps=a.steps,
            save_steps=a.save_steps,
            save_total_limit=2,
            normalization_batches=2,
            eval_batches=1,
            num_grid_images=2,
            learning_rate=1e-2,
            overwrite_output_dir=not a.resume,
            resume_from_checkpoint="latest" if a.resume else None,
        )
    )
    trainer = ConstrainedDDPOTrainer(cfg, accelerator=acc)
    if a.hang_after_checkpoint is not None:
        save = trainer.save_checkpoint

        def save_then_hang():
            path = save()
            if trainer.global_step == a.hang_after_checkpoint:
                print("CHECKPOINTED", flush=True)
                time.sleep(600)
            return path

        trainer.save_checkpoint = save_then_hang
    report = trainer.train()
    rank = acc.process_index
    save_file(trainer.lora_state(), os.path.join(a.out, f"rank{rank}.safetensors"))
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": acc.num_processes, "multipliers": trainer.duals.multipliers.tolist(),
                   "history": trainer.history, "estimator_state": trainer.estimator.state_dict(),
                   "report_kl": report["kl"]["mean"], "report_estimator": report.get("estimator")}, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("batch_per_process", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--advantage", default="group_std")
    ap.add_argument("--high", default="jpeg_compressibility", help="the reward of the 'high' constraint")
    ap.add_argument("--save_steps", type=int, default=0)
    ap.add_argument("--hang-after-checkpoint", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    main(ap.parse_args())
