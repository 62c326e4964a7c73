# smtpplus: `make run` starts the daemon in the foreground, `make test` runs
# the whole suite; both create .venv and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= etc/smtpplus.toml

.PHONY: run test bench lint install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c 'from twisted.plugin import getPlugins, IPlugin; from twisted.plugins import smtpplus_plugin; list(getPlugins(IPlugin))'
	$(PY) -m compileall -q smtpplus twisted
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/twistd --nodaemon --pidfile= smtpplus --config $(CONFIG)

test: $(STAMP)
	$(PY) -m twisted.trial --jobs=2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check smtpplus tests bench twisted

# Byte-compiled as an installed package is (pip compiles at install), so
# that start-up figures hold where PYTHONDONTWRITEBYTECODE is set.
bench: $(STAMP)
	$(PY) -m compileall -q smtpplus twisted
	$(PY) -m bench

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info
