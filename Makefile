# Two entry points: `make lab` (set up and open the course) and `make test` (set up and test).
# Both create .venv on first use and refresh it when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
WORKERS ?= 2
# Tests read real MNIST from the shared folder beside the clone when it is there (never the network).
SHARED_MNIST := $(abspath ../shared/data/mnist)
TEST_DATA := $(if $(NFCOURSE_DATA),$(NFCOURSE_DATA),$(if $(wildcard $(SHARED_MNIST)/*.gz),$(SHARED_MNIST)))

.PHONY: lab test test-gpu lint bench bench-gpu release venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Install the CPU build of torch first: with it present, the range in pyproject.toml is
	# satisfied and pip never fetches a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[course,dev]"
	# normflows (the comparison in benchmarks/glow_vs_normflows.py) without its dependencies:
	# they are torch and numpy, and pip must not replace the CPU torch.
	$(PY) -m pip install -q --no-deps "normflows>=1.7,<2"
	$(VENV)/bin/jupyter server extension enable --sys-prefix nbgrader.server_extensions.formgrader >/dev/null 2>&1 || true
	touch $(STAMP)

lab: $(STAMP)
	# grading/ on the config path lets the nbgrader extensions (formgrader, Validate) find the
	# course's nbgrader_config.py; --allow-root only where JupyterLab runs as root (containers).
	# The venv's bin on PATH: the formgrader runs `alembic` from there to open the gradebook.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" JUPYTER_CONFIG_PATH=$(CURDIR)/grading \
		$(VENV)/bin/jupyter lab --notebook-dir=lessons \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

test: $(STAMP)
	NFCOURSE_FAST=1 NFCOURSE_DATA=$(TEST_DATA) MPLBACKEND=Agg OMP_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS) --dist loadgroup --durations=15

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu -p no:xdist -rA

lint: $(STAMP)
	$(VENV)/bin/ruff check nfcourse tests benchmarks

release: $(STAMP)
	$(VENV)/bin/nfcourse grade release

bench: $(STAMP)
	$(PY) benchmarks/two_moons.py
	$(PY) benchmarks/cnf_gif.py
	NFCOURSE_DATA=$(TEST_DATA) $(PY) benchmarks/grading.py

# On a machine with an NVIDIA GPU (the self-hosted runner). normflows without its
# dependencies: they are torch and numpy, already here, and pip must not swap torch.
bench-gpu: $(STAMP)
	$(PY) -m pip install -q --no-deps normflows
	NFCOURSE_DATA=$(TEST_DATA) $(PY) benchmarks/mnist_multiscale.py --json runs/mnist_multiscale.json
	NFCOURSE_DATA=$(TEST_DATA) $(PY) benchmarks/glow_vs_normflows.py --json runs/glow_vs_normflows.json

clean:
	rm -rf $(VENV) grading/submitted grading/autograded grading/feedback grading/gradebook.db
