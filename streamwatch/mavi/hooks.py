"""What the MAVI clients tell their owner, as the store reports its commits through
`on_commit`: the clients know no metrics (import-linter keeps `streamwatch.mavi` free of
storage, metrics and policy)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["RequestHook"]


class RequestHook(Protocol):
    """Told of every single request to MAVI (each retry alone): the endpoint, how it ended
    (`ok`, or the failure's outcome label, README: Metrics) and how long it took."""

    def __call__(self, endpoint: str, outcome: str, seconds: float) -> None: ...
