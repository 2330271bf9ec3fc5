"""Which failures of a cluster-channel subscription count as a lost subscription (the
listener subscribes again) and which are faults that must surface."""

from __future__ import annotations

from coredis.exceptions import ConnectionError as RedisConnectionError

from gateway.store.redis_bus import _unless_connection_trouble


def _raised_while_handling(error: BaseException, context: BaseException) -> BaseException:
    try:
        try:
            raise context
        except BaseException:
            raise error from None
    except BaseException as exc:
        exc.__suppress_context__ = False
        return exc


def test_a_lost_connection_is_a_lost_subscription():
    lost = ExceptionGroup("nursery", [RedisConnectionError("Connection lost")])

    assert _unless_connection_trouble(lost) is None


def test_the_key_error_of_a_sharded_subscription_cleaning_up_after_a_failover_is_lost_too():
    # coredis, cleaning up after the old primary's connection died, looks the shard up by
    # a node id it no longer holds
    lost = ExceptionGroup("shard", [RedisConnectionError("Connection lost")])
    cleanup = _raised_while_handling(KeyError("38b48e25"), lost)

    assert _unless_connection_trouble(ExceptionGroup("nursery", [cleanup])) is None


def test_other_errors_surface():
    bug = KeyError("no such key")
    other = _raised_while_handling(KeyError("x"), ValueError("not a connection"))

    assert _unless_connection_trouble(bug) is bug
    rest = _unless_connection_trouble(ExceptionGroup("nursery", [other]))
    assert rest is not None and rest.exceptions == (other,)
