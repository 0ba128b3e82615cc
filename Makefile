# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-chaos migrate demo bench clean

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

# Web (daphne, HTTP + WebSocket) and worker (django-q2 qcluster) under supervisord, on
# http://127.0.0.1:$JOBSITE_PORT (8000): a worker that dies is started again, the web stays up;
# Ctrl-C stops both, running jobs checkpointed. supervisord.conf says how; Procfile is for honcho.
run: demo
	JOBSITE_DATA_DIR="$${JOBSITE_DATA_DIR:-$(CURDIR)/.data}" JOBSITE_PORT="$${JOBSITE_PORT:-8000}" \
		$(VENV)/bin/supervisord -c supervisord.conf

# The suite; the fault campaigns (marker chaos: workers killed at random, PostgreSQL restarted,
# 100 concurrent starts) run apart with `make test-chaos`, and CI runs both.
test: $(STAMP)
	$(PY) -m pytest -m "not chaos" $(PYTEST_ARGS)

test-chaos: $(STAMP)
	$(PY) -m pytest -m chaos $(PYTEST_ARGS)

# The benchmarks (not part of test): bench/RESULTS.md says what they print and what was measured.
bench: $(STAMP)
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/extraction.py
	$(PY) bench/jobs.py
	$(PY) bench/training.py
	$(PY) bench/shards.py

# The README's screenshots (docs/screenshots/): a fresh demo database, daphne + qcluster, headless Chromium.
.PHONY: screenshots
screenshots: $(STAMP)
	$(PY) bench/screenshots.py

clean:
	rm -rf .data tests/artifacts
