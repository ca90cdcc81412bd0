# rpc-tasks developer commands. Needs only python3 (>= 3.10); everything else goes in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: install demo django-demo test test-unit test-oldest-dramatiq lint bench bench-obs chaos docs docs-serve try-newcomer clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# django-ipc 1.0.9 for the interop tests, in its own venv: it pins redis<7 and websockets<16,
# which would downgrade what the suite runs on (tests/integration/test_compat_ipc_server.py).
IPC_VENV ?= .venv-ipc
IPC_STAMP := $(IPC_VENV)/.installed-stamp
$(IPC_STAMP): pyproject.toml
	$(PYTHON) -m venv $(IPC_VENV)
	$(IPC_VENV)/bin/python -m pip install --quiet "django-ipc==1.0.9"
	touch $(IPC_STAMP)

install: $(STAMP) $(IPC_STAMP)

# Celery, matplotlib and tqdm for the benchmark's comparison paths, plot and progress bar.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

# arq for the benchmark's arq paths, in its own venv: arq pins redis<6, the project needs
# redis-py >= 7 (benchmarks/arq_env.py). Optional: `make bench` goes on without it (the arq
# paths are then skipped with a notice).
ARQ_VENV ?= .venv-arq
ARQ_VERSION ?= 0.28.0
ARQ_STAMP := $(ARQ_VENV)/.installed-stamp
$(ARQ_STAMP): Makefile
	$(PYTHON) -m venv $(ARQ_VENV)
	$(ARQ_VENV)/bin/python -m pip install --quiet "arq==$(ARQ_VERSION)"
	touch $(ARQ_STAMP)

## Run the quick-start demo: a worker, .send(), .call(), a remote error, a timeout.
demo: $(STAMP)
	$(PY) -m examples.quickstart.demo

## Run the example Django project (worker, WebSocket server, bridge, dev server); Ctrl-C stops it.
django-demo: $(STAMP)
	$(PY) examples/django_project/run.py

## Run the whole test suite (unit + integration against real Redis/RabbitMQ).
test: $(STAMP) $(IPC_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest tests/django --ds=project.test_settings $(PYTEST_ARGS)

## The broker tests against the oldest Dramatiq pyproject.toml allows (the newest is what
## `make install` gets; CI runs both).
OLDEST_DRAMATIQ ?= 2.0.0
OLD_VENV := .venv-dramatiq-$(OLDEST_DRAMATIQ)
$(OLD_VENV)/.installed-stamp: pyproject.toml
	$(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLD_VENV)/bin/python -m pip install --quiet -e ".[dev]" "dramatiq[redis,rabbitmq]==$(OLDEST_DRAMATIQ)"
	touch $@

test-oldest-dramatiq: $(OLD_VENV)/.installed-stamp
	$(OLD_VENV)/bin/python -m pytest tests/unit/test_layout.py tests/integration/test_blocking_broker.py \
		tests/integration/test_redis_broker.py tests/integration/test_retry_middleware.py \
		tests/integration/test_rabbitmq_broker.py $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## ruff, mypy, and tests/check_assertions.py (every test function asserts something).
lint: $(STAMP)
	$(PY) tests/check_assertions.py tests
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

## Benchmarks against the raw Redis floors, Dramatiq's Results, Celery, Taskiq and arq (BENCH_ARGS=--quick).
bench: $(BENCH_STAMP)
	@$(MAKE) --no-print-directory $(ARQ_STAMP) || echo "could not create $(ARQ_VENV): the arq paths will be skipped"
	$(PY) -m benchmarks.run --arq-python $(ARQ_VENV)/bin/python $(BENCH_ARGS)

## The cost of tracing and metrics: rounds with fresh workers pinned to one CPU (~10 min).
bench-obs: $(BENCH_STAMP)
	$(PY) -m benchmarks.obs_cost $(OBS_ARGS)

## Fault suite (private Redis, real workers/servers, faults injected; ~4 min): one table of counts.
chaos: $(STAMP)
	$(PY) -m benchmarks.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) $(ARQ_VENV) .venv-dramatiq-* .pytest_cache .mypy_cache .ruff_cache *.egg-info

## Build the docs site (MkDocs + Material, API reference from the docstrings) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

## Serve the docs with live reload on http://127.0.0.1:8000/.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

## The newcomer path, checked: a fresh clone, the README's two commands, its first example.
try-newcomer:
	bash .ci/try-newcomer
