# Every target does its own setup: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest mpitest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,mpi,compression]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff format --check hpc runtime launchers tests benchmarks examples
	$(VENV)/bin/ruff check hpc runtime launchers tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q --ignore=tests/mpi $(PYTEST_ARGS)

# pytest-mpi: the same tests run on every rank of a real MPI launch.
mpitest: $(STAMP)
	$(VENV)/bin/mpiexec -n 3 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi
	$(VENV)/bin/mpiexec -n 4 $(PY) -m pytest -q -p no:cacheprovider --with-mpi tests/mpi

test: lint typecheck mpitest pytest

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
