"""Encryption at rest of client-supplied provider keys (BYOK), with the server's secret."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken


class SealError(ValueError):
    """A sealed value cannot be opened with this server's secret."""


def _fernet(secret: str) -> Fernet:
    # Fernet wants 32 url-safe base64 bytes; any length of operator secret maps onto that.
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))


def seal(secret: str, plaintext: str) -> str:
    """Encrypt and authenticate ``plaintext`` with ``secret``."""
    return _fernet(secret).encrypt(plaintext.encode()).decode()


def unseal(secret: str, sealed: str) -> str:
    """The plaintext of a value ``seal`` produced with the same secret."""
    try:
        return _fernet(secret).decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise SealError("the sealed value does not open with this secret") from None
