"""A training run that can be killed mid-way, for tests/test_resume.py.

usage: resume_worker.py OUT_DIR MAX_STEPS [--hang-after-checkpoint N] [--resume]
Writes OUT_DIR/final.json (λ history) when it completes; with --hang-after-checkpoint it
sleeps after writing checkpoint-N so the test can SIGKILL it there."""

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from cdalign import ConstrainedDDPOTrainer  # noqa: E402
from cdalign.alignment.config import config_from_dict  # noqa: E402


def main() -> None:
    out, max_steps = sys.argv[1], int(sys.argv[2])
    hang = int(sys.argv[sys.argv.index("--hang-after-checkpoint") + 1]) if "--hang-after-checkpoint" in sys.argv else None
    cfg = config_from_dict(
        dict(
            pretrained_model_name_or_path="cdalign/tiny-random-sd",
            prompts="shapes",
            output_dir=os.path.join(out, "run"),
            normalization_cache_dir=os.path.join(out, "cache"),
            objective={"type": "kl"},
            constraints=[{"reward": "saturation", "direction": "high", "threshold": 1.0}],
            dual={"optimizer": "nupi", "kappa_i": 0.5, "kappa_p": 0.5, "nu": 0.5, "init": 0.1},
            num_inference_steps=4,
            backprop_steps=1,
            backprop_strategy="uniform",
            backprop_min_steps=1,
            kl_value_steps=1,
            resolution=32,
            train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=max_steps,
            save_steps=1,
            save_total_limit=2,
            normalization_batches=2,
            eval_batches=1,
            num_grid_images=2,
            learning_rate=1e-2,
            resume_from_checkpoint="latest" if "--resume" in sys.argv else None,
        )
    )
    trainer = ConstrainedDDPOTrainer(cfg)
    if hang is not None:
        save = trainer.save_checkpoint

        def save_then_hang():
            path = save()
            if trainer.global_step == hang:
                print("CHECKPOINTED", flush=True)
                time.sleep(600)
            return path

        trainer.save_checkpoint = save_then_hang
    trainer.train()
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump({"history": trainer.history, "multipliers": trainer.duals.multipliers.tolist()}, f)


if __name__ == "__main__":
    main()
