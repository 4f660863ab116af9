# `make test` installs what the tests need into .venv (CPU build of torch on machines without a
# GPU) and runs the whole suite. .ci/run calls it on a clean checkout.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: test test-quick install demo lint format clean

# `make demo`: installs what the demo needs (MLX on Apple silicon, else the CPU build of torch) and runs
# `parrot demo`: the small Parrot shipped in the package answers questions about pictures in six languages
demo: $(VENV)/.demo-installed
	$(VENV)/bin/parrot demo

$(VENV)/.demo-installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ "$$(uname -s)-$$(uname -m)" = "Darwin-arm64" ]; then $(PY) -m pip install -q -e ".[mlx]"; \
	elif $(PY) -c "import torch" 2>/dev/null; then $(PY) -m pip install -q -e ".[torch]"; \
	else $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" \
	  || $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	  $(PY) -m pip install -q -e ".[torch]"; fi
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# the quick loop (under 3 minutes on 2 cores): skips the tests marked slow (torchrun / DeepSpeed runs, the
# wheel install) and runs a tenth of the fuzz cases; `make test` (CI) runs everything
test-quick: install
	PARROT_QUICK=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	else $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" \
	  || $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; fi
	$(PY) -m pip install -q -e ".[dev]"
	@# the chat page's browser test (tests/test_serve_page.py) drives Debian's Chromium; install it where we
	@# can (root with apt-get), never fail the install when we cannot (the test then skips, saying why)
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q chromium >/dev/null 2>&1)) || echo "note: could not install chromium (browser test will skip)"; fi
	touch $@

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
