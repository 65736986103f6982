# Entry points, each self-contained on a fresh machine:
#   make test       creates .venv, installs the project with its test extras, checks format and lint
#                   (ruff), runs every test on two worker processes (pytest-xdist)
#   make test-fast  the same venv, only the tests not marked slow (no subprocess, training or
#                   end-to-end runs): the quick check while working
#   make eval       creates .venv-eval (the project without its test extras: no torch), runs the
#                   embedded default evaluation
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EVAL_VENV := .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
# torch is pinned: the CPU build of 2.13.0 is a local wheel; an unpinned torch pulls CUDA packages.
TORCH_PIN := torch==2.13.0
# Same transformers as the lent GPU machine, so both sides of every comparison run the same code.
TRANSFORMERS_PIN := transformers==5.17.0

# The testbed's test split is a pure function of (split, seed, config): generated, not committed (54 MB).
TESTBED_SPLIT := experiments/data/testbed_test/questions.jsonl

.PHONY: venv lint test test-fast eval clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" "$(TRANSFORMERS_PIN)" "jax[cpu]" -e ".[test]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests

test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# What eval needs and nothing more: no torch, no test tools.
$(EVAL_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install -q --upgrade pip
	$(EVAL_PY) -m pip install -q "$(TRANSFORMERS_PIN)" "jax[cpu]" -e .
	touch $@

$(TESTBED_SPLIT): | $(EVAL_VENV)/.installed
	$(EVAL_PY) -c "from experiments.testbed.scenes import write_split; write_split('$(dir $@)', split='test', num_items=1000)"

eval: $(EVAL_VENV)/.installed $(TESTBED_SPLIT)
	$(EVAL_PY) -m experiments.eval --flagfile=experiments/flags/testbed.flags

clean:
	rm -rf $(VENV) $(EVAL_VENV) *.egg-info
