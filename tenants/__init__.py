"""Tenants, their members, end users, provider credentials and API keys; authentication."""
