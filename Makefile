# Every target sets up what it needs. torch is installed first, pinned to the
# CPU build available here, so that no dependency pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test bench base demo checks clean docs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Two pytest workers, one test file each at a time (a file's module fixtures, such as a tiny world, are built
# once). Every process runs one thread; on the 2-core CI machine the clean-clone suite took 39.2 min with two
# workers and 49.0 min with one, measured back to back (2026-12-03). TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= 2
test: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The configuration reference, generated from the typed schema (tests/test_docs.py checks it is current)
docs: venv
	$(PY) -m ldm_tune.config_docs > docs/config.md

# The tiny world's base model, trained here from nothing (a few minutes on a CPU), and its score
base: venv
	$(PY) -m worlds.build --check

# A LoRA teaches the tiny base a new shape; builds the base first when it is missing
demo: venv
	$(PY) -m worlds.demo

# Every method trained on the tiny world and scored before/after (about 11 min on a 2-core CPU)
checks: venv
	$(PY) -m worlds.checks all

# SD 1.5 at 512 px by default; on a CPU pass e.g. BENCH_ARGS="--resolution 256 --grads input"
bench: venv
	$(PY) bench/unet_step.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
