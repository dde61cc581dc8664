# fgtutor: `make book` builds the executable book, `make test` runs the tests.
# Both create the environment (.venv) and fetch MNIST (offline-capable) first.

PYTHON_SYS ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
PYTHON     := $(BIN)/python
# MNIST lives here (see fgtutor/data.py); override with `make FGTUTOR_DATA=/path ...`
export FGTUTOR_DATA ?= $(HOME)/.cache/fgtutor
# run one chapter with papermill: make run NB=book/mlp.ipynb PARAMS="-p epochs 50"
NB     ?= book/mlp.ipynb
PARAMS ?=

.PHONY: setup data test book run bench clean

setup: $(VENV)/.installed

# re-install only when the requirements or the package metadata change
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PYTHON_SYS) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

data: setup
	$(PYTHON) -m fgtutor.data

test: setup data
	$(PYTHON) -m pytest

book: setup data _build/.package-stamp
	$(BIN)/jupyter-book build --warningiserror --keep-going .
	@echo "Open _build/html/index.html"

# Jupyter Book re-executes a chapter only when the chapter changes. When the package
# changes, start from a clean _build so that every chapter runs against the new code.
_build/.package-stamp: $(wildcard fgtutor/*.py)
	rm -rf _build
	@mkdir -p _build
	touch $@

# like `papermill NB OUT -p ...`, but unknown parameter names are an error
run: setup data
	$(PYTHON) -m fgtutor.book $(NB) $(OUT) $(PARAMS)

bench: setup
	$(PYTHON) -m fgtutor.bench

clean:
	rm -rf _build runs .pytest_cache $(VENV)
	find . -name __pycache__ -prune -exec rm -rf {} +
