"""JobStatusPoller: one batched query per interval, back-off on failure, settled jobs."""

from __future__ import annotations

import pytest

from launchers import JobQueueError, JobState, JobStatus, JobStatusPoller


class ScriptedSystem:
    """Answers query() from a dict of states the test changes, recording each call."""

    def __init__(self) -> None:
        self.states: dict[str, JobState] = {}
        self.calls: list[list[str]] = []
        self.failures: list[JobQueueError] = []

    def query(self, job_ids):
        ids = list(job_ids)
        self.calls.append(ids)
        if self.failures:
            raise self.failures.pop(0)
        return {j: JobStatus(j, self.states.get(j, JobState.UNKNOWN), source="test") for j in ids}


def transient() -> JobQueueError:
    return JobQueueError("squeue: Socket timed out", transient=True)


@pytest.fixture
def system():
    return ScriptedSystem()


def make(system, clock, **kw):
    kw.setdefault("min_interval", 5.0)
    kw.setdefault("max_interval", 40.0)
    return JobStatusPoller(system, clock=clock, **kw)


def test_all_jobs_are_asked_about_in_one_query(system, clock):
    poller = make(system, clock)
    for job in ("1", "2", "3"):
        poller.track(job)
        system.states[job] = JobState.RUNNING
    statuses = poller.poll()
    assert system.calls == [["1", "2", "3"]]
    assert {s.state for s in statuses.values()} == {JobState.RUNNING}


def test_queries_are_no_more_frequent_than_the_minimum_interval(system, clock):
    poller = make(system, clock)
    poller.track("1")
    system.states["1"] = JobState.PENDING
    for _ in range(10):
        poller.poll()
    assert len(system.calls) == 1
    clock.advance(4.9)
    poller.poll()
    assert len(system.calls) == 1
    assert poller.seconds_until_next_query() == pytest.approx(0.1)
    clock.advance(0.1)
    poller.poll()
    assert len(system.calls) == 2


def test_new_jobs_start_pending_without_a_query(system, clock):
    poller = make(system, clock)
    poller.track("9")
    assert poller.statuses()["9"].state is JobState.PENDING
    assert poller.statuses()["9"].source == "submit"
    assert system.calls == []


def test_ended_jobs_are_not_asked_about_again(system, clock):
    poller = make(system, clock)
    poller.track("1")
    poller.track("2")
    system.states.update({"1": JobState.COMPLETED, "2": JobState.RUNNING})
    poller.poll()
    clock.advance(5)
    poller.poll()
    assert system.calls == [["1", "2"], ["2"]]
    assert poller.is_settled("1") and not poller.is_settled("2")
    assert poller.statuses()["1"].state is JobState.COMPLETED


def test_failed_queries_back_off_doubling_up_to_the_maximum_then_recover(system, clock):
    poller = make(system, clock)
    poller.track("1")
    system.states["1"] = JobState.RUNNING
    poller.poll()  # RUNNING, next query in 5 s
    system.failures = [transient() for _ in range(4)]
    waits = []
    for _ in range(4):
        clock.advance(poller.seconds_until_next_query())
        statuses = poller.poll()
        assert statuses["1"].state is JobState.RUNNING  # the last answer stays
        waits.append(poller.seconds_until_next_query())
    assert waits == [10.0, 20.0, 40.0, 40.0]
    assert poller.last_error is not None and poller.last_error.transient
    clock.advance(40)
    poller.poll()
    assert poller.seconds_until_next_query() == 5.0 and poller.last_error is None


def test_permanent_query_failure_is_raised_and_still_backs_off(system, clock):
    poller = make(system, clock)
    poller.track("1")
    system.failures = [JobQueueError("squeue: command not found", transient=False)]
    with pytest.raises(JobQueueError, match="not found"):
        poller.poll()
    assert poller.seconds_until_next_query() == 10.0


def test_one_unknown_answer_keeps_the_last_state_and_a_vanished_job_settles(system, clock):
    poller = make(system, clock, unknown_limit=3)
    poller.track("1")
    system.states["1"] = JobState.RUNNING
    poller.poll()
    del system.states["1"]  # left the batch system's memory
    for _ in range(2):
        clock.advance(5)
        assert poller.poll()["1"].state is JobState.RUNNING
    clock.advance(5)
    assert poller.poll()["1"].state is JobState.UNKNOWN
    assert poller.is_settled("1")


def test_a_job_never_seen_becomes_unknown_but_is_still_asked_about(system, clock):
    poller = make(system, clock, unknown_limit=2)
    poller.track("1")
    for _ in range(2):
        poller.poll()
        clock.advance(5)
    assert poller.statuses()["1"].state is JobState.UNKNOWN
    assert not poller.is_settled("1")
    system.states["1"] = JobState.RUNNING
    assert poller.poll()["1"].state is JobState.RUNNING


def test_forget_stops_following_a_job(system, clock):
    poller = make(system, clock)
    poller.track("1")
    poller.forget("1")
    assert poller.poll() == {}
    assert system.calls == []


def test_wait_polls_at_the_allowed_rate_until_the_condition_holds(system, clock):
    poller = make(system, clock, min_interval=2.0)
    system.states["1"] = JobState.PENDING
    real_query = system.query

    def query(ids):
        if len(system.calls) == 2:  # the third query sees the job run
            system.states["1"] = JobState.RUNNING
        return real_query(ids)

    system.query = query
    result = poller.wait(
        ["1"], lambda s: s.state is JobState.RUNNING, timeout=60, sleep=clock.sleep
    )
    assert result["1"].state is JobState.RUNNING
    assert len(system.calls) == 3
    assert clock.sleeps == [2.0, 2.0]


def test_wait_returns_the_current_states_at_the_timeout(system, clock):
    poller = make(system, clock, min_interval=2.0)
    system.states["1"] = JobState.PENDING
    result = poller.wait(["1"], lambda s: s.state.is_terminal, timeout=5, sleep=clock.sleep)
    assert result["1"].state is JobState.PENDING
    assert sum(clock.sleeps) == pytest.approx(5.0)


def test_interval_settings_are_checked():
    with pytest.raises(ValueError):
        JobStatusPoller(ScriptedSystem(), min_interval=10, max_interval=5)  # type: ignore[arg-type]


def test_an_unsettled_job_is_asked_about_again_and_may_come_back(system, clock):
    poller = make(system, clock)
    poller.track("1")
    system.states["1"] = JobState.NODE_FAIL
    poller.poll()
    assert poller.is_settled("1")
    poller.unsettle("1")
    assert not poller.is_settled("1")
    assert poller.statuses()["1"].state is JobState.NODE_FAIL  # kept until told otherwise
    system.states["1"] = JobState.PENDING  # requeued under the same id
    clock.advance(5)
    assert poller.poll()["1"].state is JobState.PENDING
    assert system.calls == [["1"], ["1"]]
