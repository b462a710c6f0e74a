"""One mapping from domain failures to transport status codes, used by the gRPC servicers
and the in-process fake alike, so both transports fail the same way."""

from __future__ import annotations

from shared.kv_transfer.codec import KvError, KvRejection
from shared.transport.types import StatusCode, TransportError

# Metadata key that carries a KV rejection's reason next to the status (gRPC trailers).
KV_REJECTION_KEY = "pdserve-kv-rejection"

_KV_STATUS = {
    KvRejection.CHECKSUM: StatusCode.DATA_LOSS,
    KvRejection.DIGEST: StatusCode.DATA_LOSS,
    KvRejection.TRUNCATED: StatusCode.DATA_LOSS,
    KvRejection.SEQUENCE: StatusCode.DATA_LOSS,
    KvRejection.TOO_LARGE: StatusCode.RESOURCE_EXHAUSTED,
    KvRejection.UNKNOWN_LEASE: StatusCode.NOT_FOUND,
    KvRejection.DUPLICATE: StatusCode.ALREADY_EXISTS,
    KvRejection.CANCELLED: StatusCode.CANCELLED,
}  # everything else (version, fingerprint, leaves, dtype, shape, malformed): the sender's
# model or code does not match this worker; retrying the same bytes cannot help.


def kv_status(reason: KvRejection) -> StatusCode:
    return _KV_STATUS.get(reason, StatusCode.FAILED_PRECONDITION)


def to_transport_error(error: BaseException) -> TransportError:
    """The status a handler's exception ends its call with. Anything not a TransportError
    or KvError is a bug in the handler: INTERNAL."""
    if isinstance(error, TransportError):
        return error
    if isinstance(error, KvError):
        return TransportError(kv_status(error.reason), str(error), kv_reason=error.reason)
    return TransportError(StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
