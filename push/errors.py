"""Push's exceptions: the ones it raises, and the one it expects from its store."""

from __future__ import annotations


class PushError(Exception):
    """Base class of every error push raises on purpose."""


class CredentialsError(PushError):
    """A provider's credentials cannot be used; the message names the `[push.*]` key."""


class StoreFailure(Exception):
    """A `push.store.PushStore` call could not complete; it changed nothing.

    Stores raise it, or a subclass of it. The dispatcher counts such a failure and skips
    the wake-up (the device's items stay queued); any other exception is reported as a bug.
    """
