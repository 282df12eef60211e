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


@pytest.fixture(autouse=True)
def _torch_threads():
    # One thread per test process: OpenMP threads spin-waiting for a busy core slow a
    # 2-core machine down 20x whenever anything else runs (measured here).
    torch.set_num_threads(1)
    yield
