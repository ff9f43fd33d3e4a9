# The two commands a new user runs (README.md): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: setup demo tiny test test-fast bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

# The paper's comparison on the embedded synthetic world (configs/demo.yaml); results in runs/demo/.
demo: setup
	$(OFFLINE) $(VENV)/bin/prune-edit demo --config configs/demo.yaml --output runs/demo

# The smallest editing run: ROME + PRUNE on a random tiny GPT-2, in seconds.
tiny: setup
	$(OFFLINE) $(VENV)/bin/prune-edit fit --config configs/tiny.yaml

test: setup
	$(OFFLINE) $(VENV)/bin/python -m pytest -q

# The inner loop: everything but the multi-process tests (ddp_spawn, torchrun); CI runs them all.
test-fast: setup
	$(OFFLINE) $(VENV)/bin/python -m pytest -q -m "not slow"

bench: setup
	$(VENV)/bin/python benchmarks/restraint.py --quick
