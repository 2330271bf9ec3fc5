"""Push's exception tree: one base class and its subclasses."""

from __future__ import annotations


class PushError(Exception):
    """Base class of every error push raises on purpose."""


class CredentialsError(PushError):
    """A provider's credentials cannot be used; the message names the `[push.*]` key."""
