"""The gateway's exception tree: one base class and a handful of flat subclasses."""

from __future__ import annotations

from push.errors import StoreFailure


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration file or override is invalid; the message names the file and the key."""


class AuthError(GatewayError):
    """A `hello` token is missing, malformed, badly signed or expired."""


class StoreError(GatewayError, StoreFailure):
    """The store could not complete an operation; nothing was committed for it.

    It is also a `push.errors.StoreFailure`, the failure push's store protocol allows, so
    the push dispatcher counts it and skips the wake-up rather than report a bug.
    """


class StoreClosed(StoreError):
    """The store is shutting down and accepts no new work."""


class Overloaded(GatewayError):
    """A bounded buffer is full; the connection that filled it is closed with 1013."""
