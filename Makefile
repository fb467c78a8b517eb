# Parley: `make run` starts the demo, `make test` runs the suite. Both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo --base-url http://$(HOST):$(PORT)
	$(PY) -m config.daphne -b $(HOST) -p $(PORT) config.asgi:application

# Services mode (DATABASE_URL set) needs SECRET_KEY and FIELD_ENCRYPTION_KEYS; when the caller
# sets none, the suite runs with throwaway ones.
test: install
	SECRET_KEY="$${SECRET_KEY:-test-$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(32))')}" \
	FIELD_ENCRYPTION_KEYS="$${FIELD_ENCRYPTION_KEYS:-$$($(PY) -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')}" \
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) var
