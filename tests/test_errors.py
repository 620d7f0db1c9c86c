"""The single exception -> errno table."""

import errno

import pytest

from nbiafs import errors as e


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (e.ReadOnlyError("x"), errno.EROFS),
        (e.NotFoundError("x"), errno.ENOENT),
        (e.ForbiddenError("x"), errno.EACCES),
        (e.AuthError("x"), errno.EACCES),
        (e.TokenExpiredError("x"), errno.EACCES),
        (e.ServerError("x"), errno.EIO),
        (e.ProtocolError("x"), errno.EIO),
        (e.IntegrityError("x"), errno.EIO),
        (e.OfflineError("x"), errno.EIO),
        (e.CacheFullError("x"), errno.ENOSPC),
        (e.NotDirectoryError("x"), errno.ENOTDIR),
        (e.IsDirectoryError("x"), errno.EISDIR),
        (TimeoutError(), errno.ETIMEDOUT),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (ValueError("bug"), errno.EIO),
    ],
)
def test_errno_for_maps_each_error_kind(exc, code):
    assert e.errno_for(exc) == code


def test_a_missing_cache_file_is_not_reported_as_a_missing_archive_file():
    assert e.errno_for(FileNotFoundError(errno.ENOENT, "gone from cache")) == errno.EIO
