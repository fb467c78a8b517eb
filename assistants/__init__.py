"""Assistants over REST (`/api/v1/assistants/`): integrators configure assistants without the
admin. A surface beside compat; the Assistant model and the chat it configures stay in
conversations."""
