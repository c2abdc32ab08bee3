# The lab's commands. `make test` and `make demo` work from a fresh clone on a 2-core CPU machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo bench lint clean

install: $(STAMP)

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The default selection: every capability, with the slowest tests left to `make test-all`.
test: install
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile

test-all: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: install
	$(BIN)/lab demo

# `make bench ONLY=train,muon` runs some topics; `make bench QUICK=1` fewer repeats and sizes.
bench: install
	$(BIN)/python -m benchmarks $(if $(ONLY),--only $(ONLY)) $(if $(QUICK),--quick)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
