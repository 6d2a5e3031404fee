# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
LAB := oomnb/labextension/package.json
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test lint typecheck unit notebooks notebooks-save jest lab bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The JupyterLab sidebar: TypeScript in labextension/, built into
# oomnb/labextension/ (what wheels ship) and linked into .venv. Needs Node.
$(LAB): $(STAMP) $(wildcard labextension/src/*.ts) labextension/package.json labextension/yarn.lock labextension/style/index.css
	cd labextension && jlpm install --immutable && jlpm build
	$(BIN)/jupyter labextension develop --overwrite .
	touch $(LAB)

lab: $(LAB)

demo: $(STAMP) $(LAB)
	$(BIN)/python -m oomnb demo
	$(BIN)/python -m oomnb profile example_notebooks/02_catching_an_oom.ipynb --limit 256MiB

lint: $(STAMP) $(LAB)
	$(BIN)/ruff check oomnb tests benchmarks
	$(BIN)/ruff format --check oomnb tests benchmarks
	cd labextension && jlpm lint:check

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(LAB)
	$(BIN)/python -m pytest -p no:cacheprovider tests

jest: $(LAB)
	cd labextension && jlpm test

# Cells whose output varies (durations, reports) are run, not compared; the
# cells marked NBVAL_CHECK_OUTPUT carry the point and are compared.
notebooks: $(STAMP)
	MPLBACKEND=Agg CUDA_VISIBLE_DEVICES= $(BIN)/python -m pytest -p no:cacheprovider --nbval-lax \
		--nbval-sanitize-with example_notebooks/sanitize.cfg example_notebooks

# Re-save every example notebook with the outputs of a fresh top-to-bottom run,
# as Run All and `jupyter nbconvert --execute` give them (figures included).
# On the simulated device even where a GPU is present: nbval compares the
# saved NBVAL_CHECK_OUTPUT cells with runs on machines without one.
notebooks-save: $(STAMP)
	for nb in example_notebooks/*.ipynb; do \
		echo "$$nb"; \
		MPLBACKEND=Agg CUDA_VISIBLE_DEVICES= $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=600 "$$nb" || exit 1; \
	done

test: lint typecheck jest unit notebooks

bench: $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e ".[test,bench]"
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_census.py
	$(BIN)/python benchmarks/bench_batch_search.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache oomnb/labextension oomnb/_version.py labextension/lib labextension/node_modules
