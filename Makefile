# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test migrate demo bench clean

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

migrate: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py createcachetable

demo: migrate
	$(PY) manage.py setup_demo

# Web (daphne, HTTP + WebSocket) and worker (django-q2 qcluster) under honcho, on http://127.0.0.1:8000
run: demo
	$(VENV)/bin/honcho start -f Procfile

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmarks (not part of test): bench/RESULTS.md says what they print and what was measured.
bench: $(STAMP)
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/extraction.py
	$(PY) bench/jobs.py
	$(PY) bench/training.py

clean:
	rm -rf .data tests/artifacts
