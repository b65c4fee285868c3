"""Faults a client can see: a stable code, an HTTP status and a human message.

Like supervisor's Faults, each code is stable across versions; clients switch on the code and
show the message. The API layer turns any Fault into `{"error": {"code", "message"}}`.
"""

from __future__ import annotations


class Fault(Exception):
    code = "internal-error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidJson(Fault):
    code, status = "invalid-json", 400


class InvalidField(Fault):
    code, status = "invalid-field", 400


class ImageNotManaged(Fault):
    code, status = "image-not-managed", 403


class ImageNotFound(Fault):
    code, status = "image-not-found", 404


class SnapshotNotFound(Fault):
    code, status = "snapshot-not-found", 404


class LeaseNotFound(Fault):
    code, status = "lease-not-found", 404


class RouteNotFound(Fault):
    code, status = "not-found", 404


class MethodNotAllowed(Fault):
    code, status = "method-not-allowed", 405


class BodyTimeout(Fault):
    """The body did not arrive within api.BODY_SECONDS of the headers; the connection is
    closed after this answer (a body trickled byte by byte would hold it for minutes)."""

    code, status = "body-timeout", 408


class BodyTooLarge(Fault):
    code, status = "body-too-large", 413


class DockerUnreachable(Fault):
    code, status = "docker-unavailable", 503


class DockerFailed(Fault):
    code, status = "docker-error", 502


class JournalFailed(Fault):
    code, status = "journal-unavailable", 503


class InternalError(Fault):
    code, status = "internal-error", 500


class AccessDenied(Fault):
    code, status = "access-denied", 403


class TooManyConnections(Fault):
    """Sent by connections.ConnectionGuard before the request is read, never raised."""

    code, status = "too-many-connections", 503


class ClientDisconnected(Exception):
    """The client hung up before its whole body arrived: nobody is left to answer, and it is
    the client's doing, so it is logged in one line, not reported as an internal error."""
