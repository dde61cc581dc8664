# fgtutor: `make book` builds the executable book, `make test` runs the tests.
# Both create the environment (.venv) and fetch MNIST (offline-capable) first.
# `make check-book` opens every built page in a real (headless) Chromium and checks it.

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

.PHONY: setup data mathjax browser test book check-book results run bench clean

setup: $(VENV)/.installed

# re-install only when the requirements or the package metadata change
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PYTHON_SYS) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# MNIST, and Fashion-MNIST for fine-tuning (zeroth.ipynb): torchvision's download, else
# Debian's dataset-fashion-mnist, installed with apt-get when it is not there yet
data: setup
	$(PYTHON) -m fgtutor.mnist
	@$(PYTHON) -m fgtutor.mnist --dataset fashion_mnist || { \
	  echo "make data: installing Debian's $(FASHION_DEB) with apt-get"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { $(SUDO) apt-get install -y -qq $(FASHION_DEB) || { $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq $(FASHION_DEB); }; } && $(PYTHON) -m fgtutor.mnist --dataset fashion_mnist; }

# MathJax for offline pages (fgtutor/mathjax.py): `npm pack mathjax@3.2.2`, checksummed,
# cached beside MNIST. Without it the pages load MathJax from a CDN, and the build says so.
mathjax: setup
	$(PYTHON) -m fgtutor.mathjax || echo "make mathjax: going on without a local MathJax"

test: setup data
	$(PYTHON) -m pytest

# the book loads its full-scale runs from results/; a missing one is an error, not hours
# of training (`make results` trains and stores them)
book: export FGTUTOR_STORE = readonly
book: setup data mathjax _build/.package-stamp
	$(BIN)/jupyter-book build --warningiserror --keep-going .
	@echo "Open _build/html/index.html"

# every page of _build/html in headless Chromium: maths typeset, images loaded, no console
# error, local links resolve, no request leaves the machine, no code overflows; screenshots
# in _build/screenshots (fgtutor/browsercheck.py). Run it after `make book`.
check-book: setup browser
	$(PYTHON) -m fgtutor.browsercheck _build/html

# Debian's headless Chromium (a browser download, as `playwright install` does, is never
# needed); FGTUTOR_CHROMIUM=/path/to/chromium uses another one
FASHION_DEB := dataset-fashion-mnist
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))
browser:
	@if [ -n "$$FGTUTOR_CHROMIUM" ] || command -v chromium-headless-shell >/dev/null 2>&1 \
	    || command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || { [ "$$(id -u)" != 0 ] && [ -z "$(SUDO)" ]; }; then \
	  echo "make browser: no Chromium found and no way to install it here: install Debian's"; \
	  echo "  chromium-headless-shell (or chromium) as root, or set FGTUTOR_CHROMIUM to a Chromium"; exit 1; fi; \
	echo "make browser: installing Debian's chromium-headless-shell with apt-get"; \
	export DEBIAN_FRONTEND=noninteractive; \
	$(SUDO) apt-get install -y -qq --no-install-recommends chromium-headless-shell fonts-liberation \
	  || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends \
	       chromium-headless-shell fonts-liberation; }

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
