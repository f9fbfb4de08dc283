# ditserve: all setup on a fresh Debian 12 machine (run as root), then tests/demo/perf.
#
#   make test    Debian packages, .venv, pinned deps, editable install, stub; then pytest
#   make demo    generate images with the demo client (it starts the server itself)
#   make perf    perf_analyzer against the flux_t2i ensemble (tiny model, CPU)
#   make clean   remove .venv, caches and outputs
#
# Stamp files under .venv/ make a second run skip what is already done.

SHELL        := /bin/bash
.SHELLFLAGS  := -eu -o pipefail -c
.DEFAULT_GOAL := test

# The Triton Python-backend stub embeds the system libpython3.11: the venv must come from
# the system interpreter, not pyenv or another build of 3.11.
SYSTEM_PYTHON := /usr/bin/python3.11
VENV          := .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
STAMPS        := $(VENV)/.stamps

# python3.11 / -venv: the venv; libpython3.11: the Triton Python backend stub links it;
# libb64-0d: perf_analyzer (tritonclient 2.41.1 binary); ca-certificates: pip over HTTPS.
DEB_PACKAGES  := python3.11 python3.11-venv libpython3.11 libb64-0d ca-certificates

# --timeout: a hung test fails after 15 minutes instead of stalling CI (pytest-timeout).
PYTEST_ARGS   ?= -q --timeout=900 --durations=25

.PHONY: all setup debs venv test demo perf clean help

all: test

help:
	@sed -n '2,9p' Makefile

# ----------------------------------------------------------------------------- setup

setup: $(STAMPS)/stub

# Checked every run (dpkg-query is fast); apt-get update + install only when missing.
debs:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	  if ! dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed"; then \
	    missing="$$missing $$p"; \
	  fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo ">> installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv, recreated if it was made from another interpreter.
$(STAMPS)/venv: | debs
	@if [ -f $(VENV)/pyvenv.cfg ] && ! grep -qx 'home = /usr/bin' $(VENV)/pyvenv.cfg; then \
	  echo ">> $(VENV) was not made from $(SYSTEM_PYTHON): recreating"; rm -rf $(VENV); \
	fi
	$(SYSTEM_PYTHON) -m venv $(VENV)
	@mkdir -p $(STAMPS) && touch $@

# Pinned dependencies. torch==2.13.0 resolves to the local CPU wheel (pip find-links);
# refuse a CUDA build if one was pulled in anyway.
$(STAMPS)/deps: requirements.txt $(STAMPS)/venv
	$(PIP) install -r requirements.txt
	@$(PY) -c 'import os, sys, numpy, torch; \
	  assert numpy.__version__.startswith("1."), "numpy 2 breaks the Triton Python backend"; \
	  cuda = torch.version.cuda; \
	  bad = cuda and not os.environ.get("DITSERVE_ALLOW_CUDA_TORCH"); \
	  sys.exit("torch %s is a CUDA build (%s), expected the CPU wheel; DITSERVE_ALLOW_CUDA_TORCH=1 accepts it" % (torch.__version__, cuda)) if bad else print(">> torch", torch.__version__, "numpy", numpy.__version__)'
	@touch $@

$(STAMPS)/editable: pyproject.toml $(STAMPS)/deps
	$(PIP) install --no-deps -e .
	@touch $@

# Python-backend stub for this Python next to libtriton_python.so (server.py redoes this
# idempotently at every start; doing it here makes a plain `tritonserver` work too).
$(STAMPS)/stub: $(STAMPS)/editable
	$(PY) -c 'from ditserve.server import prepare_backend_dir; print(">> backend dir:", prepare_backend_dir())'
	@touch $@

# ----------------------------------------------------------------------------- targets

# pytest exit code 5 = no tests collected: not a failure of the setup.
test: setup
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 0; fi; \
	exit $$rc

demo: setup
	$(PY) -m ditserve.client.demo --output-dir out/

perf: setup debs
	$(PY) perf/perf_analyzer.py

clean:
	rm -rf $(VENV) .cache out build .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
