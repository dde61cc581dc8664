# fgtutor: `make book` builds the executable book, `make test` runs the tests.
# Both create the environment (.venv) and fetch MNIST (offline-capable) first.

PYTHON_SYS ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
PYTHON     := $(BIN)/python
# MNIST lives here (see fgtutor/mnist.py); override with `make FGTUTOR_DATA=/path ...`
export FGTUTOR_DATA ?= $(HOME)/.cache/fgtutor
# run one chapter with papermill: make run NB=book/mlp.ipynb PARAMS="-p epochs 50"
NB     ?= book/mlp.ipynb
PARAMS ?=
# make results: parallel training processes, RETRAIN=1 to train stored runs again,
# CHAPTERS to limit it to some chapters (default: every chapter in _toc.yml)
JOBS     ?= 1
RETRAIN  ?=
CHAPTERS ?=

.PHONY: setup data test book results run bench clean

setup: $(VENV)/.installed

# re-install only when the requirements or the package metadata change
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PYTHON_SYS) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

data: setup
	$(PYTHON) -m fgtutor.mnist

test: setup data
	$(PYTHON) -m pytest

# the book loads its full-scale runs from results/; a missing one is an error, not hours
# of training (`make results` trains and stores them)
book: export FGTUTOR_STORE = readonly
book: setup data _build/.package-stamp
	$(BIN)/jupyter-book build --warningiserror --keep-going .
	@echo "Open _build/html/index.html"

# Jupyter Book re-executes a chapter only when the chapter changes. When the package
# changes, start from a clean _build so that every chapter runs against the new code.
_build/.package-stamp: $(wildcard fgtutor/*.py) $(wildcard results/*/*.json.gz)
	rm -rf _build
	@mkdir -p _build
	touch $@

# execute the chapters with training allowed: every run they ask for ends up in results/
results: setup data
	$(PYTHON) -m fgtutor.store --jobs $(JOBS) $(if $(RETRAIN),--retrain) $(CHAPTERS)

# like `papermill NB OUT -p ...`, but unknown parameter names are an error
run: setup data
	$(PYTHON) -m fgtutor.book $(NB) $(OUT) $(PARAMS)

bench: setup
	$(PYTHON) -m fgtutor.bench

clean:
	rm -rf _build runs .pytest_cache $(VENV)
	find . -name __pycache__ -prune -exec rm -rf {} +
