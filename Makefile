# `make demo` trains on the embedded MNIST data; `make test` runs every test this machine can run.
# Both create/refresh .venv/ with the pinned versions of constraints.txt first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1

.PHONY: venv test test-core demo lint bench clean

$(STAMP): setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -c constraints.txt -e '.[dev,eval,slurm]'
	touch $(STAMP)

# DeepSpeed JIT-builds a shared-memory comm op on first init; build it once, here, so parallel
# ranks and Slurm jobs never build it concurrently (repo-local TORCH_EXTENSIONS_DIR).
$(TORCH_EXTENSIONS_DIR)/.built: $(STAMP)
	$(VPY) -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load(verbose=False)"
	touch $@

venv: $(STAMP) $(TORCH_EXTENSIONS_DIR)/.built

test: venv
	$(VPY) -m ruff check mdt_ds tests eval benchmarks slurm
	$(VPY) -m pytest -ra -p no:cacheprovider --durations=15 tests

test-core: venv
	$(VPY) -m pytest -q -m core tests

# DEMO_ARGS passes options through, e.g. make demo DEMO_ARGS="--seed 1" (python -m mdt_ds.demo -h).
DEMO_ARGS ?=
demo: venv
	$(VPY) -m mdt_ds.demo $(DEMO_ARGS)

lint: venv
	$(VPY) -m ruff check mdt_ds tests eval benchmarks slurm
	$(VPY) -m ruff format --check mdt_ds tests eval benchmarks slurm

bench: venv
	$(VPY) benchmarks/train_step.py --preset MDTv2-S/2

clean:
	rm -rf $(VENV) .torch_extensions runs
