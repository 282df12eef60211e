PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install align compare test test-fast bench bench-step demo docs

# torch first, pinned: an unpinned torch (or a package wanting a newer one) pulls a multi-GB CUDA build.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,demo,metric]"

# The main job: constrained alignment of the embedded tiny model, offline on a CPU.
align: install
	HF_HUB_OFFLINE=1 accelerate launch --config_file recipes/accelerate_configs/cpu.yaml -m cdalign align

# The paper's baseline beside the main job: the same run with λ frozen at its initial value and at
# the mean of the constrained run's final λ; writes comparison.md and samples_comparison.png.
compare:
	HF_HUB_OFFLINE=1 accelerate launch --config_file recipes/accelerate_configs/cpu.yaml recipes/equal_weights.py --run outputs/tiny-multi-reward

# The Space demo on the embedded tiny model: http://127.0.0.1:7860 (runs listed from outputs/).
demo:
	HF_HUB_OFFLINE=1 $(PYTHON) -m cdalign demo --runs_dir outputs

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# The side-by-side table of benchmarks/RESULTS.md (trl in its own venv, ~50 min on 2 cores).
bench:
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_peers.py

# cdalign's rows alone (minutes).
bench-step:
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/bench_step.py

# Regenerate docs/reference/config.md from the config fields' help (tests/test_docs.py fails while it is stale).
docs:
	$(PYTHON) docs/gen_config_reference.py
