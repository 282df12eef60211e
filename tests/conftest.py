import os

# Tests never reach the Hub: without this a Hub call retries for minutes.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see recipes/align.py)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The seeded tiny random pipeline saved once in diffusers format."""
    from cdalign.models.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _cdalign_cache(tmp_path_factory):
    """cdalign's caches between runs (reward statistics, base-model evaluation values) in a
    folder of this session, inherited by the scripts the tests run: tests never read or fill
    the user's ``~/.cache/cdalign``."""
    os.environ["CDALIGN_CACHE"] = str(tmp_path_factory.mktemp("cdalign-cache"))
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    # One thread per test process: OpenMP threads spin-waiting for a busy core slow a
    # 2-core machine down 20x whenever anything else runs (measured here).
    torch.set_num_threads(1)
    yield
