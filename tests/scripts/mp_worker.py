"""Run a few trainer steps on the tiny pipeline and dump λ and the LoRA per rank.

Launched by tests/test_distributed.py with ``torchrun --nproc_per_node N`` (gloo on CPU)
or as one plain process; writes ``<out>/rank<k>.json`` and ``<out>/rank<k>.safetensors``."""

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cdalign import ConstrainedDDPOTrainer  # noqa: E402
from cdalign.config import config_from_dict  # noqa: E402


def main(out: str, batch_per_process: int, steps: int) -> None:
    acc = Accelerator(cpu=True)
    cfg = config_from_dict(
        dict(
            pretrained_model_name_or_path="cdalign/tiny-random-sd",
            prompts="shapes",
            output_dir=os.path.join(out, "run"),
            normalization_cache_dir=os.path.join(out, f"cache-{acc.num_processes}"),
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
            overwrite_output_dir=True,
        )
    )
    trainer = ConstrainedDDPOTrainer(cfg, accelerator=acc)
    report = trainer.train()
    rank = acc.process_index
    lora = {k: v.detach().cpu().contiguous() for k, v in trainer._lora_params().items()}
    save_file(lora, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "world": acc.num_processes,
                "multipliers": trainer.duals.multipliers.tolist(),
                "normalization": {n: s.__dict__ for n, s in trainer.normalizers.items()},
                "report_kl": report["kl"]["mean"],
                "history": trainer.history,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
