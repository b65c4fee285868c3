"""systemd notifications (sd_notify) and the watchdog ping.

The `sdnotify` package swallows every error silently; this wrapper logs the first failure so a
broken NOTIFY_SOCKET is visible, and stays a no-op when there is no NOTIFY_SOCKET at all.
"""

from __future__ import annotations

import asyncio
import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._failed = False
        if self.enabled:
            try:
                self._notifier = sdnotify.SystemdNotifier(debug=True)  # debug: raise, don't hide
                # Sent from the event loop: a receiver that stops reading (a stuck PID 1, a
                # full queue) must cost a dropped message, never a blocked loop.
                self._notifier.socket.setblocking(False)
            except Exception as error:
                self._log_failure(error)

    def _log_failure(self, error: BaseException) -> None:
        if not self._failed:
            log.warning(
                "systemd notify failed (NOTIFY_SOCKET=%s): %s",
                os.environ.get("NOTIFY_SOCKET"),
                error,
            )
            self._failed = True

    def send(self, *lines: str) -> None:
        """Send one datagram with the given `KEY=value` lines."""
        if self._notifier is None:
            return
        try:
            self._notifier.notify("\n".join(lines))
        except Exception as error:  # sdnotify raises whatever the socket raises
            self._log_failure(error)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None when the watchdog is off."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2 / 1_000_000
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
            return None

    async def ping_watchdog(self, interval: float) -> None:
        """Ping from the event loop, so a blocked loop stops the pings and systemd notices."""
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
