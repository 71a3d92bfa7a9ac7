"""Shared-secret checks for stores that several parties reach (``dir://``).

A store directory records a salted SHA-256 of its token (never the token). A client presents
the token; :func:`check_token` recomputes and compares in constant time
(``hmac.compare_digest``), so neither a wrong guess's position nor its length leaks timing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from dataflow.contracts import InvalidInputError, UnauthorizedError


@dataclass(frozen=True)
class TokenPolicy:
    """What a store requires: nothing (``digest`` None) or the token hashing to ``digest``."""

    salt: str = ""
    digest: str | None = None

    @property
    def required(self) -> bool:
        """Whether a token must be presented."""
        return self.digest is not None


def policy_for(token: str | None) -> TokenPolicy:
    """The policy a new store created with ``token`` records."""
    if token is None:
        return TokenPolicy()
    check_token_shape(token)
    salt = secrets.token_hex(16)
    return TokenPolicy(salt, _digest(salt, token))


def check_token(policy: TokenPolicy, presented: str | None, where: str) -> None:
    """Raise ``UnauthorizedError`` unless ``presented`` satisfies ``policy``.

    A token presented to a store that requires none is refused too (``InvalidInputError``): a
    client believing its data is protected when it is not is a misconfiguration.
    """
    if not policy.required:
        if presented is not None:
            raise InvalidInputError(
                f"{where} was created without a token, but one was presented; "
                "refusing rather than pretending the store is protected"
            )
        return
    if presented is None:
        raise UnauthorizedError(f"{where} requires a token and none was presented")
    if not isinstance(presented, str) or not hmac.compare_digest(
        _digest(policy.salt, presented), policy.digest or ""
    ):
        raise UnauthorizedError(f"{where}: the presented token is wrong")


def _digest(salt: str, token: str) -> str:
    return hashlib.sha256(f"{salt}:{token}".encode()).hexdigest()


def check_token_shape(token: object) -> None:
    """Refuse a token that is not a str of at least 8 characters (``InvalidInputError``)."""
    if not isinstance(token, str) or len(token) < 8:
        raise InvalidInputError("a store token must be a str of at least 8 characters")
