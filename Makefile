# Two entry points (see README): `make run` and `make test`. Each installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint clean mlflow-ui smoke-report compute-report

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/icd fixtures
	$(BIN)/icd run --preset smoke

# The suite on 2 worker processes, each file whole on one worker (its module fixtures built
# once), the longest files first (tests/conftest.py); PYTEST_XDIST= runs it in one process.
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder

# mypy runs beside the suite (it fills the CPU the suite leaves idle while its tests wait on
# servers and subprocesses); its report is printed after the suite's, and the target fails
# if either fails.
test: $(STAMP)
	$(BIN)/ruff format --check icd tests
	$(BIN)/ruff check icd tests
	@mkdir -p .icd
	$(BIN)/mypy icd/method icd/tasks icd/flows icd/storage icd/models icd/data icd/report \
		> .icd/mypy.log 2>&1 & mypy=$$!; \
	$(BIN)/python -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS); tests=$$?; \
	wait $$mypy; typed=$$?; echo "mypy:"; cat .icd/mypy.log; \
	test $$tests -eq 0 && test $$typed -eq 0

# The README's "What the smoke run shows": the smoke benchmark (every mode, two budgets) on
# the mini-world, its comparison table and accuracy-vs-annotation plot copied to docs/smoke.
smoke-report: $(STAMP)
	rm -rf .icd/smoke-report
	$(BIN)/icd benchmark smoke --id smoke-report --set storage.root=$(CURDIR)/.icd/smoke-report
	mkdir -p docs/smoke
	cp .icd/smoke-report/benchmarks/smoke-report/comparison.md docs/smoke/comparison.md
	cp .icd/smoke-report/benchmarks/smoke-report/report/accuracy_vs_annotation.png docs/smoke/

compute-report: $(STAMP)
	rm -rf .icd/compute-report
	$(BIN)/icd benchmark compute --id compute-report --set storage.root=$(CURDIR)/.icd/compute-report
	mkdir -p docs/compute
	cp .icd/compute-report/benchmarks/compute-report/comparison.md docs/compute/comparison.md
	cp .icd/compute-report/benchmarks/compute-report/report/accuracy_vs_compute.png docs/compute/

lint: $(STAMP)
	$(BIN)/ruff format icd tests
	$(BIN)/ruff check --fix icd tests

clean:
	rm -rf .icd

mlflow-ui: $(STAMP)
	@echo "runs table: http://127.0.0.1:5000/#/experiments/$$($(BIN)/python -c 'import mlflow; e = mlflow.MlflowClient("sqlite:///$(CURDIR)/.icd/mlflow.db").get_experiment_by_name("icd"); print(e.experiment_id if e else 1)' 2>/dev/null)/runs"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.icd/mlflow.db \
		--host 127.0.0.1 --port 5000 --workers 1
