"""The adaptive policy: a pure function of the load, plus patience before scaling down."""

from __future__ import annotations

import pytest

from launchers import Adaptive, AdaptivePolicy, ClusterLoad, JobConfigError


@pytest.fixture
def policy():
    return AdaptivePolicy(minimum_jobs=0, maximum_jobs=10, workers_per_job=2, threads_per_worker=1)


def test_queued_work_asks_for_enough_jobs_to_run_it(policy):
    # 7 tasks, 2 slots per job: 4 more jobs.
    assert policy.recommend(queued_tasks=7, idle_workers=0, running_jobs=1, pending_jobs=0) == 5


def test_pending_jobs_count_as_capacity_on_its_way(policy):
    # Need 2 jobs' worth; 3 are already queued: keep them, add none.
    assert policy.recommend(queued_tasks=4, idle_workers=0, running_jobs=1, pending_jobs=3) == 4
    # Need 4 jobs' worth; 1 queued: 3 more.
    assert policy.recommend(queued_tasks=8, idle_workers=0, running_jobs=1, pending_jobs=1) == 5


def test_idle_workers_absorb_queued_work_before_new_jobs_are_asked_for(policy):
    assert policy.recommend(queued_tasks=3, idle_workers=3, running_jobs=2, pending_jobs=0) == 2
    assert policy.recommend(queued_tasks=5, idle_workers=3, running_jobs=2, pending_jobs=0) == 3


def test_without_queued_work_idle_jobs_and_pending_jobs_can_go(policy):
    assert policy.recommend(queued_tasks=0, idle_workers=4, running_jobs=3, pending_jobs=2) == 1
    assert policy.recommend(queued_tasks=0, idle_workers=1, running_jobs=3, pending_jobs=0) == 3
    assert policy.recommend(queued_tasks=0, idle_workers=0, running_jobs=2, pending_jobs=0) == 2


def test_recommendations_stay_within_the_bounds():
    policy = AdaptivePolicy(minimum_jobs=1, maximum_jobs=3)
    assert policy.recommend(queued_tasks=1000, idle_workers=0, running_jobs=0, pending_jobs=0) == 3
    assert policy.recommend(queued_tasks=0, idle_workers=5, running_jobs=5, pending_jobs=0) == 1
    assert policy.recommend(queued_tasks=0, idle_workers=0, running_jobs=0, pending_jobs=0) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"minimum_jobs": -1},
        {"minimum_jobs": 3, "maximum_jobs": 2},
        {"workers_per_job": 0},
        {"threads_per_worker": 0},
    ],
)
def test_impossible_bounds_are_config_errors(kwargs):
    with pytest.raises(JobConfigError):
        AdaptivePolicy(**kwargs)


def test_scaling_up_is_immediate_and_scaling_down_waits_for_consecutive_lulls(policy):
    adaptive = Adaptive(policy, wait_count=3)
    busy = ClusterLoad(queued_tasks=6, idle_workers=0)
    idle = ClusterLoad(queued_tasks=0, idle_workers=4)
    assert adaptive.step(busy, running_jobs=1, pending_jobs=0) == 4
    assert adaptive.step(idle, running_jobs=4, pending_jobs=0) == 4
    assert adaptive.step(idle, running_jobs=4, pending_jobs=0) == 4
    assert adaptive.step(idle, running_jobs=4, pending_jobs=0) == 2


def test_a_busy_step_resets_the_patience(policy):
    adaptive = Adaptive(policy, wait_count=2)
    idle = ClusterLoad(queued_tasks=0, idle_workers=2)
    steady = ClusterLoad(queued_tasks=1, idle_workers=0)
    assert adaptive.step(idle, running_jobs=2, pending_jobs=0) == 2
    assert adaptive.step(steady, running_jobs=2, pending_jobs=0) == 3
    assert adaptive.step(idle, running_jobs=3, pending_jobs=0) == 3
    assert adaptive.step(idle, running_jobs=3, pending_jobs=0) == 2


def test_above_the_maximum_scales_down_at_once():
    adaptive = Adaptive(AdaptivePolicy(maximum_jobs=2), wait_count=5)
    assert adaptive.step(ClusterLoad(0, 0), running_jobs=4, pending_jobs=0) == 2


def test_wait_count_must_be_positive(policy):
    with pytest.raises(JobConfigError):
        Adaptive(policy, wait_count=0)
