"""Progress reports: a bar reports its position to the thread's sink, throttled, always 100%."""

from __future__ import annotations

import io
import threading

from polyalign.stages.core import progress


def test_a_bar_reports_to_the_sink_of_its_thread_throttled_and_always_at_the_end():
    seen: list[float] = []
    with progress.reporting_to(seen.append, every_seconds=3600):
        b = progress.bar(total=8, file=io.StringIO())
        for _ in range(8):
            b.update(1)
        b.close()
    assert seen == [12.5, 100.0]  # the first report, then (an hour not having passed) only the end
    every: list[float] = []
    with progress.reporting_to(every.append, every_seconds=0):
        for step in range(1, 5):
            progress.report(step, 4)
        progress.report(4, 4)  # an unchanged value is not sent twice
    assert every == [25.0, 50.0, 75.0, 100.0]


def test_without_a_sink_or_in_another_thread_nothing_is_reported():
    seen: list[float] = []
    progress.report(1, 2)  # no sink: nothing happens
    with progress.reporting_to(seen.append, every_seconds=0):
        other = threading.Thread(target=progress.report, args=(1, 2))
        other.start()
        other.join()
        progress.report(0, 0)  # no total: nothing to say
    assert seen == []
