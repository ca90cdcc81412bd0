# rpc-tasks developer commands. Needs only python3 (>= 3.10); everything else goes in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: install demo django-demo test test-unit test-oldest-dramatiq lint bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Celery, matplotlib and tqdm for the benchmark's comparison paths, plot and progress bar.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

## Run the quick-start demo: a worker, .send(), .call(), a remote error, a timeout.
demo: $(STAMP)
	$(PY) -m examples.quickstart.demo

## Run the example Django project (worker, WebSocket server, bridge, dev server); Ctrl-C stops it.
django-demo: $(STAMP)
	$(PY) examples/django_project/run.py

## Run the whole test suite (unit + integration against real Redis/RabbitMQ).
test: $(STAMP)
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

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

## Benchmarks against the raw Redis floors, Dramatiq's Results and Celery (BENCH_ARGS=--quick).
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

## Fault suite (private Redis, real workers/servers, faults injected; ~4 min): one table of counts.
chaos: $(STAMP)
	$(PY) -m benchmarks.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .venv-dramatiq-* .pytest_cache .mypy_cache .ruff_cache *.egg-info
