"""JobSpec: every setting is converted and checked when it is set."""

from __future__ import annotations

import datetime
from importlib import resources

import pytest
import yaml

from launchers import (
    JobConfigError,
    JobSpec,
    MPIImplementation,
    RestartMode,
    format_walltime,
    parse_walltime,
)
from launchers._spec import memory_mib
from runtime.errors import ConfigError, HPCError


def test_unknown_setting_is_an_error_listing_the_valid_ones():
    with pytest.raises(JobConfigError) as info:
        JobSpec(cores=4)
    message = str(info.value)
    assert "'cores'" in message
    for valid in ("cores_per_task", "tasks_per_node", "walltime", "memory", "queue"):
        assert valid in message


def test_unknown_setting_fails_before_any_other_is_changed():
    spec = JobSpec(nodes=2)
    with pytest.raises(JobConfigError):
        spec.update({"nodes": 5, "nodez": 1})
    assert spec.nodes == 2


def test_job_config_error_is_a_config_error_under_the_common_root():
    assert issubclass(JobConfigError, ConfigError)
    assert issubclass(JobConfigError, HPCError)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cores_per_task", -1),
        ("cores_per_task", 0),
        ("nodes", 0),
        ("tasks_per_node", -3),
        ("gpus_per_node", -1),
        ("nodes", 1.5),
        ("nodes", True),
        ("nodes", "two"),
    ],
)
def test_impossible_counts_fail_when_assigned(field, value):
    spec = JobSpec()
    with pytest.raises(JobConfigError, match=field):
        setattr(spec, field, value)
    with pytest.raises(JobConfigError, match=field):
        JobSpec(**{field: value})


def test_counts_accept_digit_strings_from_command_lines():
    assert JobSpec(nodes="3").nodes == 3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("01:30:00", 5400),
        ("1:00:05", 3605),
        ("2-00:00:00", 172800),
        ("0-01:00:00", 3600),
        ("90min", 5400),
        ("2h", 7200),
        ("45s", 45),
        (600, 600),
        (0.5, 1),
        (datetime.timedelta(minutes=3), 180),
    ],
)
def test_walltime_forms_that_are_accepted(text, seconds):
    assert parse_walltime(text) == seconds
    assert JobSpec(walltime=text).walltime == seconds


@pytest.mark.parametrize(
    "text",
    ["1:2:3:4", "10:00", "abc", "1:60:00", "-5", "0", 0, -10, "1-2", "", True, [1]],
)
def test_malformed_or_impossible_walltime_fails_when_set(text):
    spec = JobSpec()
    with pytest.raises(JobConfigError, match="walltime"):
        spec.walltime = text


def test_two_part_walltime_is_refused_as_ambiguous():
    with pytest.raises(JobConfigError, match="ambiguous"):
        JobSpec(walltime="30:00")


def test_walltime_formats_for_slurm_and_pbs():
    assert format_walltime(59) == "00:00:59"
    assert format_walltime(90061, days=True) == "1-01:01:01"
    assert format_walltime(90061) == "25:01:01"


def test_memory_is_bytes_and_scripts_get_mib_rounded_down():
    assert JobSpec(memory="4GiB").memory == 4 * 2**30
    assert memory_mib(JobSpec(memory="4GiB").memory) == 4096
    assert memory_mib(JobSpec(memory="4GB").memory) == 3814
    assert memory_mib(JobSpec(memory=1000).memory) == 1


@pytest.mark.parametrize("value", ["lots", "-1GB", 0, "0MB"])
def test_bad_memory_fails_when_set(value):
    with pytest.raises(JobConfigError, match="memory"):
        JobSpec(memory=value)


@pytest.mark.parametrize("field", ["name", "queue", "account", "log_directory"])
def test_values_bound_for_directives_refuse_line_breaks(field):
    with pytest.raises(JobConfigError, match="line break"):
        JobSpec(**{field: "debug\n#SBATCH --account=stolen"})


def test_extra_directives_refuse_line_breaks():
    with pytest.raises(JobConfigError, match="line break"):
        JobSpec(extra_directives=["--exclusive\n#SBATCH --qos=high"])


def test_queue_and_interface_refuse_spaces():
    with pytest.raises(JobConfigError, match="spaces"):
        JobSpec(queue="my queue")
    with pytest.raises(JobConfigError, match="spaces"):
        JobSpec(interface="ib 0")


def test_env_takes_a_mapping_or_name_value_strings():
    assert JobSpec(env={"A": 1, "B": "x y"}).env == (("A", "1"), ("B", "x y"))
    assert JobSpec(env=["A=1", "B=x=y"]).env == (("A", "1"), ("B", "x=y"))


@pytest.mark.parametrize("env", [{"1A": "x"}, {"A-B": "x"}, {"A B": "x"}, ["NOEQUALS"], "A=1"])
def test_env_refuses_bad_names_and_shapes(env):
    with pytest.raises(JobConfigError, match="env"):
        JobSpec(env=env)


def test_list_settings_take_a_string_or_a_list():
    spec = JobSpec(mpi_args="--bind-to core --map-by 'ppr:1:node'", prologue="module load mpi")
    assert spec.mpi_args == ("--bind-to", "core", "--map-by", "ppr:1:node")
    assert spec.prologue == ("module load mpi",)
    assert JobSpec(runtime_args=["--nthreads", "4"]).runtime_args == ("--nthreads", "4")


def test_mpi_implementation_is_an_enum_with_listed_choices():
    assert JobSpec(mpi_implementation="OpenMPI").mpi_implementation is MPIImplementation.OPENMPI
    with pytest.raises(JobConfigError, match="mpich, openmpi, other"):
        JobSpec(mpi_implementation="intel")


def test_dashed_names_from_yaml_are_accepted():
    spec = JobSpec(**{"tasks-per-node": 4, "cores-per-task": 2})
    assert (spec.tasks_per_node, spec.cores_per_task, spec.total_tasks) == (4, 2, 4)


def test_replace_and_to_dict_round_trip():
    spec = JobSpec(name="x", memory="1GiB", env={"A": "1"}, mpi_args=["-v"])
    again = JobSpec(**spec.to_dict())
    assert again == spec
    changed = spec.replace(nodes=3)
    assert changed.nodes == 3 and spec.nodes == 1
    assert "nodes=3" in repr(changed)


def test_package_defaults_match_the_built_in_defaults():
    text = resources.files("launchers").joinpath("launchers.yaml").read_text()
    job = yaml.safe_load(text)["launchers"]["job"]
    assert set(job) == {f.replace("_", "-") for f in JobSpec.FIELDS}
    assert JobSpec(**job) == JobSpec()


# --- draining before the walltime, and restarting ------------------------------------


def test_restart_settings_default_to_no_restart_and_a_two_minute_drain():
    spec = JobSpec()
    assert spec.restart is RestartMode.NONE
    assert (spec.drain_lead, spec.drain_signal, spec.max_restarts) == (120, "USR2", 10)
    assert spec.drain_after == 3600 - 120


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("requeue", RestartMode.REQUEUE),
        ("RESUBMIT", RestartMode.RESUBMIT),
        (None, RestartMode.NONE),
    ],
)
def test_restart_takes_the_three_modes(value, mode):
    assert JobSpec(restart=value).restart is mode
    assert JobSpec(**JobSpec(restart=value).to_dict()).restart is mode


def test_a_bad_restart_value_names_the_valid_ones():
    with pytest.raises(
        JobConfigError, match="restart 'always' is not one of: none, requeue, resubmit"
    ):
        JobSpec(restart="always")


@pytest.mark.parametrize(
    ("value", "seconds"), [("2min", 120), (90, 90), ("00:05:00", 300), (0.2, 1)]
)
def test_drain_lead_is_a_duration_in_whole_seconds(value, seconds):
    assert JobSpec(drain_lead=value).drain_lead == seconds


@pytest.mark.parametrize("value", [0, -5, "soon", True])
def test_drain_lead_must_be_a_positive_duration(value):
    with pytest.raises(JobConfigError, match="drain_lead"):
        JobSpec(drain_lead=value)


def test_drain_lead_not_shorter_than_the_walltime_names_both_when_checked():
    # Not when assigned: walltime and drain_lead may be set in either order.
    spec = JobSpec(walltime="00:01:00", restart="resubmit")
    spec.drain_lead = "30s"
    spec.check()
    assert spec.drain_after == 30
    spec.drain_lead = "1min"
    with pytest.raises(JobConfigError) as info:
        spec.check()
    message = str(info.value)
    assert "drain_lead 00:01:00 (60 s)" in message and "walltime 00:01:00 (60 s)" in message
    with pytest.raises(JobConfigError, match="drain_lead"):
        _ = spec.drain_after


def test_a_job_that_does_not_restart_and_has_no_time_for_the_lead_does_not_drain():
    # The default lead (2 min) must not make a short job without restarts an error.
    spec = JobSpec(walltime="00:01:00")
    spec.check()
    assert spec.drain_after is None


def test_without_a_walltime_there_is_no_drain_time():
    spec = JobSpec(walltime=None, drain_lead="1h")
    spec.check()
    assert spec.drain_after is None


@pytest.mark.parametrize(
    ("value", "name"), [("USR2", "USR2"), ("sigterm", "TERM"), ("SIGINT", "INT")]
)
def test_drain_signal_is_stored_as_the_name_without_sig(value, name):
    assert JobSpec(drain_signal=value).drain_signal == name


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("USR1", "MPICH"),
        ("SIGKILL", "cannot be caught"),
        ("STOP", "cannot be caught"),
        ("BOGUS", "not a signal"),
    ],
)
def test_drain_signals_that_cannot_work_are_refused(value, why):
    with pytest.raises(JobConfigError, match=why):
        JobSpec(drain_signal=value)


def test_max_restarts_is_a_count_from_zero():
    assert JobSpec(max_restarts=0).max_restarts == 0
    with pytest.raises(JobConfigError, match="max_restarts"):
        JobSpec(max_restarts=-1)


@pytest.mark.parametrize("name", ["HPC_JOB_RESTART", "HPC_JOB_DRAIN_AT", "HPC_JOB_RESTARTS"])
def test_env_cannot_set_the_launchers_own_job_variables(name):
    with pytest.raises(JobConfigError, match=f"{name} is set by the launcher"):
        JobSpec(env={name: "1"})
