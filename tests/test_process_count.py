"""One recipe and seed, one run, whatever the process count (issue 34): ``global_batch_size``
splits the micro-batch over the processes; the CPU thread default; what a non-main process
prints. The 2-process runs themselves are in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from cdalign.alignment.config import ConstrainedDDPOConfig, load_config_file
from cdalign.console import command_output
from cdalign.core.seeding import batch_share, per_process
from cdalign.runs.resources import set_cpu_threads


def test_global_batch_splits_over_processes_and_draws_the_same_images():
    cfg = load_config_file("tiny/multi_reward")
    assert cfg.global_batch_size == 4
    one, two = cfg.for_processes(1), cfg.for_processes(2)
    assert (one.train_batch_size, two.train_batch_size) == (4, 2)
    assert cfg.train_batch_size == 4  # the given config is not changed
    prompts = [f"p{i}" for i in range(50)]
    whole = batch_share(0, 0, 3, prompts, one.train_batch_size, 1, 0)
    halves = [batch_share(0, 0, 3, prompts, two.train_batch_size, 2, r) for r in range(2)]
    assert whole[0] == halves[0][0] + halves[1][0] and whole[1] == halves[0][1] + halves[1][1]


def test_a_batch_that_does_not_split_or_disagrees_is_refused_naming_the_fix():
    cfg = load_config_file("tiny/multi_reward")
    with pytest.raises(ValueError, match=r"^global_batch_size: 4 images do not split evenly over 3 processes"):
        cfg.for_processes(3)
    cfg.train_batch_size = 3
    with pytest.raises(ValueError, match=r"^train_batch_size: 3 disagrees with global_batch_size 4 over 2 process"):
        cfg.for_processes(2)
    with pytest.raises(ValueError, match=r"^distill.batch_size: 3 images do not split evenly over 2 processes"):
        per_process(3, 2, "distill.batch_size")


def test_without_a_global_batch_the_config_runs_as_given():
    cfg = ConstrainedDDPOConfig()
    assert cfg.global_batch_size is None and cfg.for_processes(2) is cfg


def test_cpu_threads_default_to_one_unless_a_launcher_or_the_config_says(monkeypatch):
    saved = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert set_cpu_threads("cpu", None) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # accelerate launch: cores / processes
        assert set_cpu_threads("cpu", None) == 2
        assert set_cpu_threads("cpu", 3) == 3  # num_threads in the config wins
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads("meta", None) == 2  # not a CPU run: torch's setting is kept
    finally:
        torch.set_num_threads(saved)


def test_only_the_main_process_prints_info_and_warnings(monkeypatch, capsys):
    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with command_output() as logger:
            logger.info("hello from rank %s", rank)
            logger.warning("careful")
            logger.error("broken on rank %s", rank)
        err = capsys.readouterr().err
        assert ("hello from rank" in err) is shown and ("warning: careful" in err) is shown
        assert f"error: broken on rank {rank}" in err  # errors name their rank and always show
