"""Errors from the MAVI API, each saying what the operator can do about it."""

from __future__ import annotations

__all__ = [
    "AuthError",
    "CapacityError",
    "InsufficientBalance",
    "MaviError",
    "RateLimited",
    "RejectedRequest",
    "TransientError",
]


class MaviError(Exception):
    """Any failure talking to MAVI. `status` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(MaviError):
    """HTTP 401: the API key is wrong or revoked. Fix the key; retrying will not help."""


class InsufficientBalance(MaviError):
    """HTTP 402: the account balance cannot pay for a start. Top up, then `streamwatch resume`."""


class TransientError(MaviError):
    """5xx, a timeout or a broken connection: worth retrying later."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """HTTP 429: too many requests. Honour `retry_after` when MAVI sends it."""


class CapacityError(MaviError):
    """Another 4xx at start: MAVI refused the task (e.g. the concurrent-stream limit)."""


class RejectedRequest(MaviError):
    """A 2xx answer whose body is not what the contract describes."""
