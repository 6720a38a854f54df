# The two set-up commands: `make demo` and `make test`. Both create .venv on first use; `make test`
# first checks what the suite needs from the system (deploy/system-deps.sh: as root it installs it).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test system-deps lint bench clean
# the system check comes before .venv is made: making it may need python3-venv
.NOTPARALLEL: test

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[litert,tflite,converter,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo

test: system-deps $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

system-deps:
	@deploy/system-deps.sh $(PYTHON)

# mypy runs through tests/support/typecheck.py: the import package `edgefleet` is put together from
# three folders (setup.py's package_dir), which mypy cannot see by itself (pyproject.toml, [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check agent converter edgefleet tests bench demo
	$(BIN)/python -m tests.support.typecheck

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .cache/mypy .cache/typecheck .ruff_cache *.egg-info build dist
