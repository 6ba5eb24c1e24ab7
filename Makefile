# Developer entry points. `make demo` and `make test` work on a fresh Debian 12 machine.
#
#   make demo                  demo upstream + gateway on ./gateway.yaml, prints a key; Ctrl-C stops it
#   make test                  PostgreSQL and Redis on loopback, then the whole suite
#   make test PYTEST_ARGS='tests/test_services.py -q'
#   make lint                  ruff and mypy
#   make check                 lint, then test
#   make bench                 the benchmark (installs nginx and wrk when missing)
#   make clean / distclean     remove caches and build output / and .venv too

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=
BENCH_ARGS ?=
export PYTEST_ARGS

# $(call apt_install,PACKAGE...): install Debian packages (as root) without letting their
# maintainer scripts start system-wide services; the project starts its own servers.
define apt_install
if [ "$$(id -u)" -ne 0 ]; then echo "make: need root to install: $(1) (or: sudo apt-get install $(1))" >&2; exit 1; fi; \
added=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; added=1; fi; \
status=0; \
{ DEBIAN_FRONTEND=noninteractive apt-get update -q && \
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1); } || status=$$?; \
if [ -n "$$added" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
[ "$$status" -eq 0 ]
endef

.PHONY: help venv install demo test lint check bench clean distclean

help:
	@sed -n '3,9s/^#   //p' $(firstword $(MAKEFILE_LIST))

venv: $(VENV)/bin/python

install: $(STAMP)

# Debian's python3 needs python3-venv for `-m venv`; it is installed on the first failure.
$(VENV)/bin/python:
	@echo "creating $(VENV) with $(PYTHON)"
	@if ! $(PYTHON) -m venv --clear $(VENV); then \
	  echo "make: '$(PYTHON) -m venv' failed; installing python3-venv" >&2; \
	  $(call apt_install,python3-venv); \
	  $(PYTHON) -m venv --clear $(VENV); \
	fi

$(STAMP): pyproject.toml $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --disable-pip-version-check -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/python -m gateway demo

test: install
	scripts/test-services.sh

lint: install
	$(VENV)/bin/ruff check $(wildcard gateway tests bench)
	$(VENV)/bin/mypy

check: lint test

bench: install
	missing=""; \
	[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then $(call apt_install,$$missing); fi
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf build dist .testenv .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
