# Two set-up commands: `make demo` (the embedded synthetic default) and `make test` (ruff, then the test suite).
# Both create .venv when missing and install the package with everything it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/cdcl: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,wsi]'
	touch $(BIN)/cdcl

install: $(BIN)/cdcl

demo: install
	$(BIN)/cdcl demo --out cdcl-demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) cdcl-demo
