"""Secrets at rest: MultiFernet over FIELD_ENCRYPTION_KEYS (the first encrypts, all decrypt)."""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.db import models


class SecretUnreadable(RuntimeError):
    """No configured key decrypts this value."""


@lru_cache(maxsize=8)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key.encode()) for key in keys])


def fernet() -> MultiFernet:
    return _fernet(tuple(settings.FIELD_ENCRYPTION_KEYS))


def encrypt(plaintext: str) -> str:
    return fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("no FIELD_ENCRYPTION_KEYS entry decrypts this secret") from None


def rotate(token: str) -> str:
    """Re-encrypt with the first key."""
    return fernet().rotate(token.encode()).decode()


def mask(secret: str) -> str:
    """`sk-…abcd`: enough to recognise a key, never enough to use it."""
    if not secret:
        return ""
    head = secret[:3] if secret.startswith("sk-") else ""
    return f"{head}…{secret[-4:]}" if len(secret) > 8 else "…"


class EncryptedTextField(models.TextField):
    """Stores Fernet ciphertext; Python code sees plaintext. Not searchable, by design."""

    def from_db_value(self, value, expression, connection):
        if value is None or value == "":
            return value
        return decrypt(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(value)
