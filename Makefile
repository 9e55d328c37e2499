# Two commands: `make demo` and `make test`. Each creates (or reuses) the virtual
# environment in $(VENV) and installs what it needs. Only Python >= 3.10 and make are needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ipb-installed
# torch is pinned first so a newer release (gigabytes of CUDA wheels) is never pulled in.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "ipb-ray needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PINS)
	# The rest with uv when it installs (downloads in parallel: ~15 s against ~3 min for pip);
	# torch is already there and satisfies the project's pins, so uv leaves it alone.
	( $(BIN)/python -m pip install --quiet --disable-pip-version-check uv && \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[test]' ) || \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ipb demo

# pytest exits 5 when it collects no tests; make treats any non-zero exit as failure.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The pure tests only (no Ray cluster, no long end-to-end runs): about a minute and a half.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not ray and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo .pytest_cache
