# One command each on a fresh machine (python3 with venv, a C++ compiler and the Python headers):
#   make train   sets up the environment if needed, then runs the main job on its built-in default data
#   make test    sets up the environment if needed, then runs the test suite
# Setting up = a virtual environment in $(VENV) with requirements.txt, and goldfish_ds installed editable, which
# compiles the extension goldfish_ds._C against that environment's torch. It is redone when requirements.txt,
# pyproject.toml, setup.py or csrc/ change. `make train ARGS="--max_steps 20"` passes options to the job,
# `make test PYTEST_ARGS="tests/test_mask.py"` to pytest.
PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=

# The environment's commands (deepspeed, mpirun, torchrun, ninja) come first, as in an activated venv.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
INSTALLED := $(VENV)/.goldfish_ds-installed

.PHONY: setup train test

setup: $(INSTALLED)

$(INSTALLED): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -r requirements.txt
	$(VENV)/bin/python -m pip install -e .
	$(VENV)/bin/python -m goldfish_ds info
	touch $@

train: setup
	deepspeed scripts/pretrain.py $(ARGS)

test: setup
	python -m pytest -q $(PYTEST_ARGS)
