"""Sentry reporting, switched on only when a DSN is configured.

Until `init` switches it on every capture call is a no-op, so callers never need to check.
`sentry_sdk` is imported only then: it costs about 20 ms of start-up and 3 MiB of memory that
an agent without a DSN has no use for.
"""

from __future__ import annotations

import logging
from types import ModuleType

from . import __version__
from .config import SentrySettings
from .models import Snapshot

log = logging.getLogger(__name__)

_sentry: ModuleType | None = None  # sentry_sdk, once init() has switched reporting on


def init(settings: SentrySettings) -> bool:
    """Start the Sentry client when a DSN is set; returns whether it is on."""
    global _sentry
    if not settings.dsn:
        return False
    import sentry_sdk

    sentry_sdk.init(
        dsn=settings.dsn,
        environment=settings.environment or None,
        release=f"snapagentd@{__version__}",
        # Only our explicit captures: logging integration would double-report warnings.
        default_integrations=False,
    )
    _sentry = sentry_sdk
    log.info("sentry: reporting to %s", settings.dsn.split("@")[-1])
    return True


def capture_removal_failure(snapshot: Snapshot, error: BaseException) -> None:
    """A removal Docker refused for a reason other than 404/409: worth a human's look."""
    if _sentry is None:
        return
    _sentry.capture_exception(
        error,
        tags={"image": snapshot.image, "reason": "removal-failed"},
        contexts={"snapshot": snapshot.to_json()},
    )


def capture_wrong_removal(reference: str, image_id: str, snapshot: Snapshot) -> None:
    """Docker removed a reference the agent had not chosen: always worth a human's look."""
    if _sentry is None:
        return
    _sentry.capture_message(
        f"wrong removal: {reference} ({image_id[:19]}) removed with {snapshot.image}",
        level="error",
        tags={"image": snapshot.image, "reason": "wrong-removal", "reference": reference},
        contexts={
            "snapshot": snapshot.to_json(),
            "removed": {"reference": reference, "image_id": image_id},
        },
    )


def capture_exception(error: BaseException) -> None:
    if _sentry is not None:
        _sentry.capture_exception(error)


def flush(timeout: float = 2.0) -> None:
    """Send what is queued before the process exits."""
    if _sentry is not None:
        _sentry.flush(timeout=timeout)
