"""The exception hierarchy of nbiafs and the one place that maps exceptions to errno values.

Every layer raises these (never bare ``requests`` or ``OSError`` surprises upward); the FUSE adapter
turns any of them into an errno with :func:`errno_for` and nothing else decides errno values.
"""

from __future__ import annotations

import errno


class NbiaError(Exception):
    """Base class of every error nbiafs raises on purpose.

    Context travels as attributes, not only inside the message: ``status`` is the HTTP status the
    server answered (None when there was no answer at all: refused, reset, timed out) and
    ``endpoint`` the API endpoint of the call.
    """

    def __init__(self, message: str = "", *, status: int | None = None, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint


class ConfigError(NbiaError):
    """Bad settings or arguments given by the user (unknown server name, bad size...)."""


class AuthError(NbiaError):
    """The server refused to issue a token (wrong user or password, locked account)."""


class TokenExpiredError(AuthError):
    """A request kept failing with 401 after one refresh and one retry."""


class ForbiddenError(NbiaError):
    """The account may not read this object (restricted collection, 400/403 on download)."""


class NotFoundError(NbiaError):
    """A name that a successful listing does not hold: the only error that becomes ENOENT.

    Only the tree (the catalog, the FUSE adapter) raises it. What the server says is missing is a
    :class:`RemoteNotFoundError`, because a failure must never look like an absence.
    """


class RemoteNotFoundError(NbiaError):
    """The server answered "not found" to a call: a 404 (a missing endpoint, a proxy's error page), or the
    500 ``getSingleImage`` gives for an instance it does not deliver. EIO, never ENOENT: the name the
    reader asked for came from a successful listing, so this is a failed call, not an absent file."""


class BadRequestError(NbiaError):
    """The server answered 400: a missing or malformed parameter."""


class ServerError(NbiaError):
    """The server failed (5xx, 429, connection reset, timeout) after bounded retries."""


class ProtocolError(NbiaError):
    """The server's answer could not be understood: malformed JSON, a short zip, a wrong size."""


class IntegrityError(ProtocolError):
    """Bytes fetched do not match the size or checksum the server announced."""


class OfflineError(NbiaError):
    """The mount runs with ``--offline`` and the answer is not in the cache."""


class ReadOnlyError(NbiaError):
    """A write was attempted on the read-only mount."""


class NotDirectoryError(NbiaError):
    """A directory operation on an instance file."""


class IsDirectoryError(NbiaError):
    """A file operation (open) on a directory."""


class NoSuchAttributeError(NbiaError):
    """An extended attribute the node does not have (ENODATA, as getxattr(2) says)."""


class CacheFullError(NbiaError):
    """The cache directory's disk is full; the fetched bytes could not be kept."""


_ERRNO: tuple[tuple[type[BaseException], int], ...] = (
    (ReadOnlyError, errno.EROFS),
    (NotFoundError, errno.ENOENT),
    (NoSuchAttributeError, errno.ENODATA),
    (RemoteNotFoundError, errno.EIO),
    (NotDirectoryError, errno.ENOTDIR),
    (IsDirectoryError, errno.EISDIR),
    (ForbiddenError, errno.EACCES),
    (AuthError, errno.EACCES),
    (OfflineError, errno.EIO),
    (CacheFullError, errno.ENOSPC),
    (ConfigError, errno.EINVAL),
    (BadRequestError, errno.EIO),
    (ProtocolError, errno.EIO),
    (ServerError, errno.EIO),
    (NbiaError, errno.EIO),
    (TimeoutError, errno.ETIMEDOUT),
    (MemoryError, errno.ENOMEM),
)


def errno_for(exc: BaseException) -> int:
    """The errno the kernel should see for ``exc``. Unknown exceptions become EIO.

    An ``OSError`` that already carries an errno (disk full while caching, say) keeps it, except
    ENOENT from the local cache, which must not look like a missing file in the tree: that is EIO.
    """
    for kind, code in _ERRNO:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return errno.EIO if exc.errno == errno.ENOENT else exc.errno
    return errno.EIO
