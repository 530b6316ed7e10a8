"""When the runner looks again at a job qemu runs (a backup, a save): when the job should end at its pace so far,
so that a job's end is seen within ``FIRST_LOOK`` and not a whole polling period late, and never in a busy loop."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmrunner.qemu.qmp import FIRST_LOOK, next_look
from vmrunner.run.suspend import SAVE_POLL, _next_look

MOST = 0.2


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "expected"),
    [
        (0, 100, 0.0, FIRST_LOOK),  # not started: the first look comes soon
        (0, 100, 0.05, 0.05),  # no progress yet: asked again after as long as it has run
        (0, 100, 3.0, MOST),
        (90, 100, 0.9, 0.1),  # a tenth left at 100 per second: a tenth of a second
        (50, 100, 1.0, MOST),  # a second left, but never more than the polling period
        (100, 100, 1.0, FIRST_LOOK),  # all done, the job not concluded yet: soon
        (999, 1000, 1.0, FIRST_LOOK),
    ],
)
def test_the_next_look_is_when_the_job_should_end(done: int, total: int, elapsed: float, expected: float) -> None:
    assert next_look(done, total, elapsed, MOST) == pytest.approx(expected)


@given(st.integers(-10, 1 << 40), st.integers(-10, 1 << 40), st.floats(-1, 1e6, allow_nan=False))
def test_the_next_look_is_never_a_busy_loop_nor_later_than_the_polling_period(
    done: int, total: int, elapsed: float
) -> None:
    assert FIRST_LOOK <= next_look(done, total, elapsed, MOST) <= MOST


def test_a_save_is_looked_at_by_the_ram_qemu_has_left_to_write() -> None:
    half = {"status": "active", "ram": {"total": 1000, "remaining": 500, "transferred": 500}}
    assert _next_look(half, 0.05) == pytest.approx(0.05)
    nearly = {"status": "active", "ram": {"total": 1000, "remaining": 10, "transferred": 990}}
    assert _next_look(nearly, 0.5) == FIRST_LOOK
    assert _next_look({"status": "setup"}, 0.5) == SAVE_POLL  # nothing known yet: the plain polling period
