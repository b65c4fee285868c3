"""Sentry reporting, switched on only when a DSN is configured.

Without `sentry_sdk.init` every capture call is a no-op, so callers never need to check.
"""

from __future__ import annotations

import logging

import sentry_sdk

from . import __version__
from .config import SentrySettings
from .models import Snapshot

log = logging.getLogger(__name__)


def init(settings: SentrySettings) -> bool:
    """Start the Sentry client when a DSN is set; returns whether it is on."""
    if not settings.dsn:
        return False
    sentry_sdk.init(
        dsn=settings.dsn,
        environment=settings.environment or None,
        release=f"snapagentd@{__version__}",
        # Only our explicit captures: logging integration would double-report warnings.
        default_integrations=False,
    )
    log.info("sentry: reporting to %s", settings.dsn.split("@")[-1])
    return True


def capture_removal_failure(snapshot: Snapshot, error: BaseException) -> None:
    """A removal Docker refused for a reason other than 404/409: worth a human's look."""
    sentry_sdk.capture_exception(
        error,
        tags={"image": snapshot.image, "reason": "removal-failed"},
        contexts={"snapshot": snapshot.to_json()},
    )


def capture_exception(error: BaseException) -> None:
    sentry_sdk.capture_exception(error)


def flush(timeout: float = 2.0) -> None:
    """Send what is queued before the process exits."""
    sentry_sdk.flush(timeout=timeout)
