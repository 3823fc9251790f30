"""Progress of long stages, for whoever watches: a terminal bar always, and, inside a flow run,
a Prefect progress artifact per stage or unit task.

Stages report through `bar(...)` (a tqdm bar that also reports) or `report(done, total)`
(training steps); the flow sets a sink for the task's thread with `reporting_to`. Outside a
flow nothing but the bar happens.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from typing import Any

Sink = Callable[[float], None]  # called with a percentage, 0 to 100
_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("polyalign_progress", default=None)


@contextlib.contextmanager
def reporting_to(sink: Sink, every_seconds: float = 5.0) -> Iterator[None]:
    """Send this thread's progress to `sink`, at most once per `every_seconds` (and always
    the first report and 100%)."""
    last = [float("-inf"), -1.0]

    def throttled(percent: float) -> None:
        now = time.monotonic()
        if percent != last[1] and (percent >= 100 or now - last[0] >= every_seconds):
            last[:] = [now, percent]
            sink(percent)

    token = _sink.set(throttled)
    try:
        yield
    finally:
        _sink.reset(token)


def report(done: float, total: float) -> None:
    """Report `done` out of `total` to the current sink, if any."""
    sink = _sink.get()
    if sink is not None and total > 0:
        sink(round(min(100.0, 100.0 * done / total), 1))


def bar(**kwargs: Any) -> Any:
    """A tqdm bar (same arguments) that also reports its position to the current sink."""
    from tqdm.auto import tqdm

    class _Reporting(tqdm):  # type: ignore[misc, valid-type]
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.total:
                report(self.n, self.total)
            return shown

    return _Reporting(**kwargs)
