"""Two CPU processes (gloo) train like one process with the same global batch: identical
λ and LoRA on every rank, and agreement with the single-process run. The same with the
UNet sharded over the processes (FSDP2, launched with recipes/accelerate_configs/fsdp.yaml),
including an exact resume of a sharded run. And composition: every rank holds the same μ
after its dual steps, equal to the single-process μ of the same global batch. And the
evaluation harness: 2 processes split the batches and write the same report as 1."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "scripts" / "mp_worker.py"
FSDP_CONFIG = Path(__file__).parents[1] / "recipes" / "accelerate_configs" / "fsdp.yaml"


def _run(cmd, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("two-processes")
    one = tmp_path_factory.mktemp("one-process")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), str(two), "2", "3"], cwd=two)
    _run([sys.executable, str(WORKER), str(one), "4", "3"], cwd=one)
    return two, one


def _meta(folder, rank):
    return json.loads((folder / f"rank{rank}.json").read_text())


def _state(folder, rank):
    return json.loads((folder / f"rank{rank}.json").read_text()), load_file(str(folder / f"rank{rank}.safetensors"))


def test_every_rank_holds_identical_duals_and_weights(runs):
    two, _ = runs
    (meta0, lora0), (meta1, lora1) = _state(two, 0), _state(two, 1)
    assert meta0["world"] == meta1["world"] == 2
    assert meta0["multipliers"] == meta1["multipliers"]
    assert meta0["normalization"] == meta1["normalization"]
    for k in lora0:
        assert torch.equal(lora0[k], lora1[k]), k


def test_two_processes_agree_with_one_process_of_the_same_global_batch(runs):
    two, one = runs
    (meta2, lora2), (meta1, lora1) = _state(two, 0), _state(one, 0)
    assert meta1["world"] == 1
    assert meta2["multipliers"] == pytest.approx(meta1["multipliers"], rel=1e-4, abs=1e-6)
    for name in meta1["normalization"]:
        assert meta2["normalization"][name]["mean"] == pytest.approx(meta1["normalization"][name]["mean"], rel=1e-5)
    # Summation order differs (gloo all-reduce of two half-batch means vs one mean), and
    # Adam divides by sqrt(v): an entry whose gradient is ~0 can move by up to a full step
    # (lr) either way on a rounding difference, so single entries are not comparable. The
    # tensors as a whole are: each within 2% (relative Frobenius norm).
    for k in lora1:
        rel = float((lora2[k] - lora1[k]).norm() / lora1[k].norm().clamp(min=1e-12))
        assert rel < 2e-2, (k, rel)
    assert meta2["report_kl"] == pytest.approx(meta1["report_kl"], rel=1e-3, abs=1e-8)


def test_only_the_main_process_writes_outputs(runs):
    two, _ = runs
    run = two / "run"
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    lines = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]  # one writer, no duplicated lines


def _accelerate_fsdp(out, *args):
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2",
          str(WORKER), str(out), "2", "3", *args], cwd=out)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded run (3 steps, checkpoint at step 2) and the same run resumed from its
    checkpoint-2 in a fresh launch."""
    straight = tmp_path_factory.mktemp("sharded")
    _accelerate_fsdp(straight, "--save_steps", "2")
    resumed = tmp_path_factory.mktemp("sharded-resumed")
    shutil.copytree(straight / "run" / "checkpoint-2", resumed / "run" / "checkpoint-2")
    shutil.copytree(straight / "cache-2", resumed / "cache-2")
    _accelerate_fsdp(resumed, "--save_steps", "2", "--resume", str(resumed / "run" / "checkpoint-2"))
    return straight, resumed


def test_sharded_run_matches_the_replicated_run(runs, sharded):
    two, _ = runs
    straight, _ = sharded
    meta0, meta1 = _meta(straight, 0), _meta(straight, 1)
    assert meta0["sharded"] and meta1["sharded"] and meta0["world"] == 2
    assert meta0["multipliers"] == meta1["multipliers"]
    replicated = _meta(two, 0)
    assert not replicated["sharded"]
    assert meta0["multipliers"] == pytest.approx(replicated["multipliers"], rel=1e-4, abs=1e-6)
    assert meta0["report_kl"] == pytest.approx(replicated["report_kl"], rel=1e-3, abs=1e-8)
    # The saved LoRA holds whole tensors (gathered from the shards), loadable like any other.
    a = load_file(str(straight / "run" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "run" / "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b)
    for k in b:
        assert a[k].shape == b[k].shape
        rel = float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12))
        assert rel < 2e-2, (k, rel)
    lines = (straight / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3]


def test_sharded_run_resumes_exactly(sharded):
    straight, resumed = sharded
    assert _meta(resumed, 0)["multipliers"] == _meta(straight, 0)["multipliers"]
    a = load_file(str(straight / "run" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "run" / "pytorch_lora_weights.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    duals = lambda folder: [{k: v for k, v in h.items() if k.startswith("dual/")} for h in _meta(folder, 0)["history"]]  # noqa: E731
    assert [h["step"] for h in _meta(resumed, 0)["history"]] == [1, 2, 3]
    assert len(duals(straight)[0]) == 2 and duals(resumed) == duals(straight)  # the λ trajectory


def test_no_process_group_thread_outlives_train(runs, sharded):
    """train() ends the process group and frees it: no gloo thread is left running into
    interpreter exit, where C++ static destructors ran under it (a sharded CPU run aborted
    now and then at exit: "terminate called without an active exception"). The workers
    exit normally, so such an abort fails the launch."""
    two, _ = runs
    straight, resumed = sharded
    for folder in (two, straight, resumed):
        for rank in (0, 1):
            assert _meta(folder, rank)["gloo_threads_after_train"] == [], (folder.name, rank)


def test_sharded_run_under_bf16_mixed_precision(tmp_path):
    """Frozen base in bf16 and LoRA in fp32, sharded together (FSDP2 gathers each dtype)."""
    _accelerate_fsdp(tmp_path, "--mixed_precision", "bf16")
    meta0, meta1 = _meta(tmp_path, 0), _meta(tmp_path, 1)
    assert meta0["sharded"] and meta0["multipliers"] == meta1["multipliers"]
    assert all(math.isfinite(v) for v in meta0["multipliers"]) and math.isfinite(meta0["report_kl"])
    lora = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in lora.values())


def _fake_accelerator(num_processes=2, distributed_type="MULTI_CPU", plugin=None):
    from types import SimpleNamespace

    return SimpleNamespace(num_processes=num_processes, distributed_type=distributed_type,
                           state=SimpleNamespace(fsdp_plugin=plugin))


def test_wants_sharding_only_answers(monkeypatch):
    from cdalign.runs import distributed

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    acc = _fake_accelerator()
    before = (vars(acc).copy(), vars(acc.state).copy())
    assert not distributed.wants_sharding(acc)  # replicated unless asked or configured
    assert distributed.wants_sharding(acc, True)
    assert not distributed.wants_sharding(_fake_accelerator(num_processes=1), True)  # one process: nothing to shard
    assert distributed.wants_sharding(_fake_accelerator(distributed_type="FSDP"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate's launcher exports on CPUs
    assert distributed.wants_sharding(acc) and not distributed.wants_sharding(acc, False)
    assert (vars(acc), vars(acc.state)) == before  # a predicate: it sets nothing


def test_deepspeed_is_refused_with_the_fix():
    from cdalign.runs import distributed

    with pytest.raises(ValueError, match="FSDP2"):
        distributed.check_distributed_setup(_fake_accelerator(distributed_type="DEEPSPEED"))


def test_fsdp1_config_is_refused_with_the_fix(monkeypatch, tmp_path):
    from cdalign import ConstrainedDDPOTrainer
    from cdalign.alignment.config import config_from_dict

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    cfg = config_from_dict(dict(
        pretrained_model_name_or_path="cdalign/tiny-random-sd", output_dir=str(tmp_path / "run"),
        objective={"type": "reward", "reward": "saturation"},
    ))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        ConstrainedDDPOTrainer(cfg, prompts=["a red circle"])


COMPOSE_WORKER = Path(__file__).parent / "scripts" / "compose_worker.py"


def test_composition_weights_are_identical_on_every_rank_and_match_one_process(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_composition import save_random_lora

    a, b = save_random_lora(tmp_path / "a", seed=1, scale=2.0), save_random_lora(tmp_path / "b", seed=2, scale=1.0)
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(COMPOSE_WORKER), str(two), str(a), str(b), "2"], cwd=two)
    _run([sys.executable, str(COMPOSE_WORKER), str(one), str(a), str(b), "2"], cwd=one)  # the same global batches
    r0, r1, single = (json.loads((d / f"rank{k}.json").read_text()) for d, k in ((two, 0), (two, 1), (one, 0)))
    assert r0["world"] == r1["world"] == 2 and single["world"] == 1
    assert r0["trained"] == r1["trained"] == single["trained"] == ["c"]  # trained in the same launch, group kept
    assert r0["learned_weights"] == r1["learned_weights"] and r0["dual_steps"] == r1["dual_steps"]
    mu2, mu1 = r0["learned_weights"], single["learned_weights"]
    assert max(mu1.values()) - min(mu1.values()) > 0.1  # the duals moved μ away from equal weights
    assert [mu2[k] for k in mu1] == pytest.approx([mu1[k] for k in mu1], abs=1e-5)
    for name, kl in single["models"]["constrained"].items():
        assert r0["models"]["constrained"][name]["mean"] == pytest.approx(kl["mean"], rel=1e-4)
    # the distillation splits its chains over the processes and averages their gradients: the
    # student sees the same global batch, so it ends where the single process's does
    timeless = [{k: v for k, v in r["distillation"].items() if k != "seconds"} for r in (r0, r1, single)]
    assert timeless[0] == timeless[1]
    assert timeless[0]["distance_to_composed_after"] == pytest.approx(timeless[2]["distance_to_composed_after"], rel=1e-3)
    for name, kl in single["models"]["distilled"].items():
        assert r0["models"]["distilled"][name]["mean"] == pytest.approx(kl["mean"], rel=1e-3)


EVALUATE = Path(__file__).parents[1] / "evaluation" / "evaluate.py"


def test_evaluation_on_two_processes_writes_the_single_process_report(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_composition import save_random_lora

    lora = save_random_lora(tmp_path / "lora", seed=1, scale=1.0)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: two-proc\nmodel: cdalign/tiny-random-sd\nprompts: shapes\nnum_prompts: 6\n"
        "rewards: [saturation, brightness]\nnum_inference_steps: 4\nresolution: 32\nbatch_size: 2\ngrid_images: 2\n"
    )
    args = [str(EVALUATE), "--config", str(suite), "--checkpoint", f"lora={lora}", "--num_threads", "1"]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
          "--output_dir", str(tmp_path / "two")], cwd=tmp_path)
    _run([sys.executable, *args, "--output_dir", str(tmp_path / "one")], cwd=tmp_path)
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    one = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    assert list(two["checkpoints"]) == ["base", "lora"]
    for name in ("base", "lora"):
        for key in ("rewards", "kl"):
            assert two["checkpoints"][name][key] == one["checkpoints"][name][key], (name, key)
    # each process cached its own batches (3 batches: 2 on rank 0, 1 on rank 1), one writer of the report
    assert len(list((tmp_path / "two" / "cache" / "lora").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "two").glob(".*tmp*"))


def test_two_processes_reuse_the_base_evaluation_and_report_the_same_numbers(tmp_path):
    """The base model's evaluation values kept across runs (cdalign.alignment.base_evaluation)
    under 2 processes: the first evaluation scores the base model on both ranks and the main
    process writes one cache file; the second samples no base image on either rank and every
    rank's report holds the first's numbers."""
    cache = tmp_path / "cdalign-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
           "CDALIGN_CACHE": str(cache)}
    worker = Path(__file__).parent / "scripts" / "base_eval_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [[e["base_samplings"] for e in rank] for rank in ranks] == [[2, 0], [2, 0]]  # 4 batches, 2 per rank
    # the main process names the files it wrote beside the report (sample_grid, eval_values); the numbers are every rank's
    numbers = [[json.dumps({k: v for k, v in e["report"].items() if k not in ("sample_grid", "eval_values")}, sort_keys=True)
                for e in rank] for rank in ranks]
    assert numbers[0][0] == numbers[0][1] == numbers[1][0] == numbers[1][1]
    assert ranks[0][0]["report"] == ranks[0][1]["report"]
    assert len(list((cache / "base_evaluation").glob("*.safetensors"))) == 1
    assert not list((cache / "base_evaluation").glob(".*tmp*"))
