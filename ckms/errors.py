"""The one exception tree of ckms.

Every error that ckms raises to a caller is a :class:`CKMSError`. The subclasses say what the
caller can do about it; errors of aiokafka, asyncssh and sqlite are translated into these where
they enter, so nothing raw reaches the CLI user. ``retriable`` lives on the class (as in
aiokafka's ``errors.py``) so callers decide without matching strings. Messages never contain key
material.
"""

from __future__ import annotations


class CKMSError(Exception):
    """Root of every error raised by ckms."""

    retriable: bool = False


class ConfigError(CKMSError):
    """Raised when settings, arguments or environment are invalid or incomplete."""


class NotFoundError(CKMSError):
    """Raised when a named key, version, host, operator or request does not exist."""


class AlreadyExistsError(CKMSError):
    """Raised when creating something whose name is already taken."""


class InvalidTransitionError(CKMSError):
    """Raised when a lifecycle operation is not allowed from the version's current state."""


class PolicyError(CKMSError):
    """Raised when an operation would break a key's policy (targets, cryptoperiod, approvals)."""


class PermissionDeniedError(CKMSError):
    """Raised when the caller's role or identity does not allow the operation."""


class NotDistributableError(PermissionDeniedError):
    """Raised when a host asks for a key version that hosts may no longer hold (suspended,
    deactivated, compromised, destroyed or without material since the host's last sync): the
    host's plan is stale, which is not the host failing to install."""


class ApprovalRequiredError(CKMSError):
    """Raised when an operation needs a second person's approval before it runs."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class SealedError(CKMSError):
    """Raised when an operation needs key material while the controller is sealed."""


class CryptoError(CKMSError):
    """Raised when a cryptographic operation fails; the message never says why in detail."""


class IntegrityError(CryptoError):
    """Raised when sealed data, a wrapped key or a signature does not verify.

    Like pyca's ``InvalidToken``, every such failure looks the same: the message names the object
    that failed, never the reason, so errors reveal nothing about the secret.
    """


class UnsealError(CryptoError):
    """Raised when shares or a passphrase do not reconstruct the root KEK."""


class ProtocolError(CKMSError):
    """Raised when an event, ack or RPC message is malformed, forged, replayed or oversized."""


class StoreError(CKMSError):
    """Raised when the database cannot be read or written."""

    retriable = True


class NotLeaderError(CKMSError):
    """Raised when leader-only work is refused: this replica does not hold the leader lease
    (it never did, or another replica took it over since)."""


class AuditError(StoreError):
    """Raised when an audit record cannot be written; the operation it guards fails with it."""

    retriable = False


class AuditAnchorError(AuditError):
    """Raised when the audit log does not extend the last checkpoint signed and published:
    the controller refuses to sign over it and to write audited operations."""


class AuditVerificationError(CKMSError):
    """Raised when the audit log does not verify; ``index`` names the first bad record."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class KafkaUnavailableError(CKMSError):
    """Raised when the Kafka cluster cannot be reached or refuses a request."""

    retriable = True


class TransportError(CKMSError):
    """Raised when the SSH connection to the controller or an agent fails."""

    retriable = True


class RequestTimeoutError(TransportError):
    """Raised when one request got no reply in time; the connection itself is kept."""


class ControllerUnavailableError(TransportError):
    """Raised on a client when the controller answered that its own store failed (a database
    restart, its disk): a passing trouble of the controller, not of the client's own state;
    the connection is kept and the request is tried again later, as after a timeout."""


class DependencyMissingError(CKMSError):
    """Raised when a tool ckms needs (Java, Maven) is not installed; the message names it."""
