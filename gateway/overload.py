"""Event-loop lag: the gateway's own measure of being overloaded."""

from __future__ import annotations

import trio

# How often the loop is probed. Short enough to react within a presence batch window,
# long enough to cost nothing measurable.
PROBE_INTERVAL = 0.1
# Weight of the newest probe in the moving average: one long pause (a full garbage
# collection, a big batch) should not count as overload; a few in a row should.
SMOOTHING = 0.2


class LoadMonitor:
    """Measures how late the Trio loop wakes a sleeping task.

    A loop that runs more work than it can keep up with wakes sleepers late; when the
    moving average of the lag exceeds `threshold` seconds the gateway sheds typing and
    coarsens presence.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.lag = 0.0
        self.average_lag = 0.0
        self.max_lag = 0.0

    @property
    def overloaded(self) -> bool:
        """Whether the loop has been lagging past the threshold, on average."""
        return self.average_lag > self.threshold

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe forever."""
        task_status.started()
        while True:
            before = trio.current_time()
            await trio.sleep(PROBE_INTERVAL)
            self.lag = max(0.0, trio.current_time() - before - PROBE_INTERVAL)
            self.average_lag += SMOOTHING * (self.lag - self.average_lag)
            self.max_lag = max(self.max_lag, self.lag)
