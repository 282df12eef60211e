"""Evaluate a tiny run twice, the second time with the base model's values reused from the
cache the first wrote, and dump each evaluation's report per rank.

Launched by tests/test_distributed.py with ``torchrun --nproc_per_node 2`` (gloo on CPU);
writes ``<out>/rank<k>.json``: the two reports and how often each evaluation sampled the base
model on this rank. The cache root is ``$CDALIGN_CACHE`` (the test sets it).

    base_eval_worker.py OUT"""

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402

from cdalign import ConstrainedDDPOTrainer  # noqa: E402
from cdalign.alignment.config import config_from_dict  # noqa: E402
from cdalign.evaluation.scoring import BaseModel  # noqa: E402

base_samplings = 0
_policy = BaseModel.policy


def counted_policy(self, sampler, prompts):
    global base_samplings
    base_samplings += 1
    return _policy(self, sampler, prompts)


BaseModel.policy = counted_policy


def main(out: str) -> None:
    acc = Accelerator(cpu=True)
    cfg = config_from_dict(dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd", prompts="shapes", output_dir=os.path.join(out, "run"),
        normalization_cache_dir=os.path.join(out, "norm"), objective={"type": "kl"},
        constraints=[{"reward": "saturation", "direction": "high", "threshold": 1.0}],
        dual={"optimizer": "ascent", "lr": 0.5, "init": 0.2}, num_inference_steps=4, backprop_steps=2, resolution=32,
        train_batch_size=2, max_steps=1, normalization_batches=2, eval_batches=2, num_grid_images=2,
        learning_rate=1e-2, eval_metrics=["shapes_accuracy"],
    ))
    trainer = ConstrainedDDPOTrainer(cfg, accelerator=acc)
    trainer.step()
    evaluations = []
    for _ in range(2):
        before = base_samplings
        report = trainer.evaluate()
        acc.wait_for_everyone()  # the main process has written the cache before anyone reads it
        evaluations.append({"report": report.to_json(), "base_samplings": base_samplings - before})
    with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as f:
        json.dump(evaluations, f)


if __name__ == "__main__":
    main(sys.argv[1])
