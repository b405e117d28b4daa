"""systemd's notify protocol, hand-rolled (a datagram to `$NOTIFY_SOCKET`), so that
`Type=notify` units know when the daemon is ready, reloading or stopping, and a watchdog can
restart a wedged event loop. Without `$NOTIFY_SOCKET` every call does nothing."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    """Sends `KEY=value` lines to the service manager."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Ping at half the interval systemd enforces, as sd_watchdog_enabled(3) advises.
        self.watchdog_seconds = int(usec) / 2e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: str | int) -> bool:
        """Send the fields (`ready=1` becomes `READY=1`). False if there is no socket."""
        if not self._address:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message, self._address)
            except OSError:
                return False
        return True

    def reloading(self) -> bool:
        """RELOADING=1 with the monotonic time newer systemd versions want."""
        return self.notify(
            reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
