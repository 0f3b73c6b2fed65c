# nemovl-trt — the targets a newcomer guesses. `make demo` and `make test` set up first when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CACHE   := .cache

.PHONY: setup demo test test-fast lint bench fuzz gpu-acceptance clean

setup: $(STAMP)

# torch is installed first, pinned to the CPU wheel (fast here; pyproject.toml only asks for a range, so
# the project install keeps it). Extras: cpu = tritonserver from nvidia-pytriton (+ numpy<2 for its
# stub), client = openai (eval / demo), decord = fallback video decoder, dev = tests and lint (+ the helm CLI
# into tools/helm, gitignored).
# GPU users: see README "Install on a GPU machine" (no torch pin there; the container's torch is kept).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,client,decord,dev]'
	bash scripts/fetch_helm.sh >/dev/null || echo "note: helm CLI not fetched; tests/test_helm_chart.py retries, else uses Helm's Go SDK"  # x86_64; no-op elsewhere
	touch $(STAMP)

demo: setup
	$(BIN)/python -m nemovl_trt.demo --workdir $(CACHE)/demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra

test-fast: setup
	$(BIN)/pytest -q -ra -m "not integration"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m benchmarks.run_all

# Longer fuzzing of the HTTP API from its OpenAPI document (schemathesis) + the bad-input corpus; `make test`
# runs the same tests with a 45 s fuzz budget. FUZZ_SECONDS / FUZZ_SEED to vary.
FUZZ_SECONDS ?= 600
FUZZ_SEED ?= 20261203
fuzz: setup
	NEMOVL_FUZZ_SECONDS=$(FUZZ_SECONDS) NEMOVL_FUZZ_SEED=$(FUZZ_SEED) $(BIN)/pytest -q -ra -s --timeout=$$(( $(FUZZ_SECONDS) + 600 )) tests/test_fuzz_api.py tests/test_fuzz_corpus.py

# One-command acceptance (docs/acceptance.md): detect the GPU and its target, build, serve, run the OpenAI
# conformance tests, the tiny-trained accuracy gate, the benchmark-format eval and a short load; writes
# .cache/acceptance/acceptance-report.{md,json}. Not tied to `setup` (that pins the CPU torch): on a GPU host
# run it inside NVIDIA's container after `pip install -e '.[gpu,client]' pytest pytest-timeout`; without a
# GPU it uses .venv (make setup) for the cpu steps and reports the GPU steps as skipped.
ACCEPTANCE_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-acceptance:
	$(ACCEPTANCE_PY) scripts/gpu_acceptance.py $(ACCEPTANCE_ARGS)

clean:
	rm -rf $(CACHE) .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
