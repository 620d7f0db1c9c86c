"""The emulator's user accounts: who may log in with which password, and who sees restricted data.

Two accounts exist, as on a real TCIA server seen from one user's side: the guest (public collections
only) and a test account that was granted the restricted collection.
"""

from __future__ import annotations

import hmac
import os

GUEST_USER = "nbia_guest"
GUEST_PASSWORD = ""
TEST_USER = "nbiafs_test"
#: The test account's password; ``NBIAFS_EMULATOR_PASSWORD`` overrides it when the emulator starts.
TEST_PASSWORD = "nbiafs-test-password"
PASSWORD_ENV = "NBIAFS_EMULATOR_PASSWORD"


def account_passwords() -> dict[str, str]:
    """User name -> password, read once per emulator (the environment may override the test password)."""
    return {GUEST_USER: GUEST_PASSWORD, TEST_USER: os.environ.get(PASSWORD_ENV, TEST_PASSWORD)}


def check_password(passwords: dict[str, str], user: str, password: str) -> bool:
    """True when ``user`` exists and ``password`` is its password (constant-time comparison)."""
    expected = passwords.get(user)
    if expected is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), password.encode("utf-8"))


def sees_restricted(user: str | None) -> bool:
    """Whether ``user`` was granted the restricted collections."""
    return user == TEST_USER
