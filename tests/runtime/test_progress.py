"""The terminal progress bar reports local computations."""

from __future__ import annotations

import io

import hpc
from runtime.progress import ProgressBar


def inc(x):
    return x + 1


def test_progress_bar_draws_a_complete_bar_at_the_end():
    out = io.StringIO()
    xs = [hpc.delayed(inc)(i) for i in range(50)]
    with ProgressBar(out=out, minimum=0.0):
        hpc.compute(*xs, scheduler="threads")
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert "100% Completed" in last
    assert "[" + "#" * 40 + "]" in last


def test_progress_bar_stays_silent_for_quick_computations():
    out = io.StringIO()
    with ProgressBar(out=out, minimum=60.0):
        hpc.delayed(inc)(1).compute(scheduler="sync")
    assert out.getvalue() == ""


def test_progress_bar_is_unregistered_on_exit():
    out = io.StringIO()
    with ProgressBar(out=out, minimum=0.0):
        pass
    hpc.delayed(inc)(1).compute(scheduler="sync")
    assert out.getvalue() == ""


def test_render_shows_fraction_and_time():
    bar = ProgressBar(width=10)
    assert bar.render(5, 10, 1.5) == "[#####     ] |  50% Completed | 1.50 s"
