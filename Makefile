# nemovl-trt — the targets a newcomer guesses. `make demo` and `make test` set up first when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CACHE   := .cache

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# torch is installed first, pinned to the CPU wheel (fast here; pyproject.toml only asks for a range, so
# the project install keeps it). Extras: cpu = tritonserver from nvidia-pytriton (+ numpy<2 for its
# stub), client = openai (eval / demo), decord = fallback video decoder, dev = tests and lint.
# GPU users: see README "Install on a GPU machine" (no torch pin there; the container's torch is kept).
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,client,decord,dev]'
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

clean:
	rm -rf $(CACHE) .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
