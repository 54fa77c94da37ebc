# Two commands for a fresh machine (Python 3.11+, make, pip):
#   make demo   installs relay in .venv and runs it against a built-in TLS+AUTH upstream
#   make test   installs relay with its test tools in .venv, runs ruff and mypy --strict, then the whole test suite
# and one for a Debian/Ubuntu server (README "Running it for real"):
#   make deb    builds dist/relay_<version>_<arch>.deb: relay in /opt/relay/venv, the unit, the relay user
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint install deb bench clean

$(BIN)/relay: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/relay

install: $(BIN)/relay

demo: install
	$(BIN)/relay demo

# -n auto: one pytest worker per core (tests/ share nothing: each has its own ports, spool and daemon)
test: install lint
	$(BIN)/python -m pytest -n auto $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check relay tests bench
	$(BIN)/mypy relay

deb:
	packaging/deb/build

bench: install
	$(BIN)/python bench/side_by_side.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache dist
