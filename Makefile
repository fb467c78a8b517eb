# Parley: `make run` starts the demo, `make test` runs the suite. Both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint install install-dev bench clean port-free services

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Refuse before migrating and seeding: a taken port would otherwise fail after "ready".
port-free: install
	@$(PY) -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
	s.bind(('$(HOST)', $(PORT)))" 2>/dev/null || { \
	echo "Port $(PORT) on $(HOST) is taken. Stop what uses it, or pick another: make run PORT=8001"; exit 1; }

run: port-free
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo --base-url http://$(HOST):$(PORT)
	$(PY) -m config.daphne -b $(HOST) -p $(PORT) config.asgi:application

# Services mode on one machine: two web processes (PORT, PORT+1), a Celery worker and beat, from
# the Procfile, against DATABASE_URL and REDIS_URL (both required; SECRET_KEY and
# FIELD_ENCRYPTION_KEYS too, as in production).
WEB ?= 2
services: install
	@test -n "$$DATABASE_URL" -a -n "$$REDIS_URL" || { \
	echo "services mode needs DATABASE_URL and REDIS_URL (see README, Deployment)"; exit 1; }
	mkdir -p var
	$(PY) manage.py migrate --noinput
	$(VENV)/bin/honcho start -f Procfile -p $(PORT) -c web=$(WEB),worker=1,beat=1

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Services mode (DATABASE_URL set) needs SECRET_KEY and FIELD_ENCRYPTION_KEYS; when the caller
# sets none, the suite runs with throwaway ones.
test: install-dev
	SECRET_KEY="$${SECRET_KEY:-test-$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(32))')}" \
	FIELD_ENCRYPTION_KEYS="$${FIELD_ENCRYPTION_KEYS:-$$($(PY) -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')}" \
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) var
