# The whole set-up: `make demo` and `make test`. Both create .venv when missing.
# torch==2.13.0 is installed first: on these machines it is the CPU wheel on local disk,
# while an unpinned torch would pull a multi-GB CUDA build.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/cnnkit train

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf .venv runs build *.egg-info src/*.egg-info
