"""Settings: package defaults, site profiles, keyword overrides, and their checks."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from launchers import (
    JobConfigError,
    JobSpec,
    PBSSystem,
    RestartMode,
    SlurmSystem,
    available_profiles,
    load_profile,
    make_system,
    resolve_settings,
)
from runtime import config as runtime_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def defaults():
    """The package's `launchers` section, independent of this process's config."""
    text = resources.files("launchers").joinpath("launchers.yaml").read_text()
    section = yaml.safe_load(text)["launchers"]
    section["profile-path"] = []  # never read the machine's ~/.config/hpc/profiles
    return section


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_launchers_defaults_are_registered_with_the_runtime_config():
    assert runtime_config.get("launchers.job.tasks-per-node") >= 1
    assert runtime_config.get("launchers.pbs.dialect") in ("pbspro", "torque")


def test_without_profile_or_arguments_the_package_defaults_apply(defaults):
    settings = resolve_settings(config=defaults)
    assert settings.system == "slurm"
    assert settings.job == JobSpec()
    assert settings.profile is None
    assert settings.seconds("status", "min-interval") == 5.0


def test_shipped_profile_is_found_by_name(defaults):
    settings = resolve_settings(profile="slurm", config=defaults)
    assert settings.profile == "shipped profile slurm.yaml"
    assert settings.job.mpi_launcher == "srun"
    assert settings.job.mpi_args == ("--mpi=pmi2",)
    assert settings.seconds("status", "min-interval") == 10.0


def test_profiles_on_the_search_path_win_over_shipped_ones(defaults, tmp_path):
    write(tmp_path / "mine" / "slurm.yaml", "system: slurm\njob:\n  queue: gpu\n")
    defaults["profile-path"] = [str(tmp_path / "absent"), str(tmp_path / "mine")]
    settings = resolve_settings(profile="slurm", config=defaults)
    assert settings.job.queue == "gpu"
    assert settings.job.mpi_launcher == "mpiexec"  # the shipped slurm profile was not used
    assert available_profiles(defaults["profile-path"])["slurm"] == str(
        tmp_path / "mine" / "slurm.yaml"
    )


def test_profile_given_as_a_path_with_underscored_keys(defaults, tmp_path):
    path = write(
        tmp_path / "site.yaml", "system: pbs\npbs:\n  dialect: torque\njob:\n  tasks_per_node: 8\n"
    )
    settings = resolve_settings(profile=str(path), config=defaults)
    assert settings.system == "pbs"
    assert settings.job.tasks_per_node == 8
    assert settings.value("pbs", "dialect") == "torque"


def test_unknown_key_in_a_profile_names_it_the_profile_and_the_valid_keys(defaults, tmp_path):
    path = write(tmp_path / "typo.yaml", "job:\n  queu: debug\n")
    with pytest.raises(JobConfigError) as info:
        resolve_settings(profile=str(path), config=defaults)
    message = str(info.value)
    assert "launchers.job.queu" in message and str(path) in message
    assert "queue" in message and "tasks-per-node" in message


def test_wrong_type_in_a_profile_is_an_error(defaults, tmp_path):
    path = write(tmp_path / "bad.yaml", "job:\n  nodes: many\n")
    with pytest.raises(JobConfigError, match="nodes"):
        resolve_settings(profile=str(path), config=defaults)


def test_malformed_profile_yaml_names_the_line(defaults, tmp_path):
    path = write(tmp_path / "broken.yaml", "job:\n  queue: [unclosed\n")
    with pytest.raises(JobConfigError, match="not valid YAML at line"):
        resolve_settings(profile=str(path), config=defaults)


def test_missing_profile_lists_the_available_ones(defaults):
    with pytest.raises(JobConfigError) as info:
        resolve_settings(profile="nosuchsite", config=defaults)
    assert "'nosuchsite'" in str(info.value)
    for name in ("slurm", "pbs", "local-mpi"):
        assert name in str(info.value)


def test_profile_for_another_system_is_refused(defaults):
    with pytest.raises(JobConfigError, match="for pbs jobs, not slurm"):
        resolve_settings(system="slurm", profile="pbs", config=defaults)


def test_keyword_arguments_override_the_profile(defaults):
    settings = resolve_settings(
        profile="pbs", config=defaults, queue="short", walltime="00:10:00", dialect="pbspro"
    )
    assert settings.job.queue == "short" and settings.job.walltime == 600
    assert settings.value("pbs", "dialect") == "pbspro"


def test_unknown_keyword_argument_lists_the_valid_ones(defaults):
    with pytest.raises(JobConfigError) as info:
        resolve_settings(config=defaults, partition="debug")
    assert "'partition'" in str(info.value)
    assert "queue" in str(info.value) and "start_timeout" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("dialect", "sge"), ("start_timeout", "soon"), ("submit_retries", -1), ("cores_per_task", -2)],
)
def test_bad_keyword_values_fail_before_anything_is_submitted(defaults, key, value):
    with pytest.raises(JobConfigError):
        resolve_settings(config=defaults, **{key: value})


def test_the_configured_default_profile_applies_when_none_is_named(defaults):
    defaults["profile"] = "local-mpi"
    settings = resolve_settings(config=defaults)
    assert settings.system == "local"
    assert settings.job.tasks_per_node == 4 and settings.job.walltime is None


def test_make_system_builds_the_named_system_with_the_retry_settings(defaults):
    defaults["submit"]["retries"] = 5
    defaults["pbs"]["dialect"] = "torque"
    pbs = make_system("pbs", defaults)
    assert isinstance(pbs, PBSSystem) and pbs.dialect == "torque"
    assert pbs.retry.retries == 5 and pbs.command_timeout == 60.0
    assert isinstance(resolve_settings(config=defaults).make_system(), SlurmSystem)
    with pytest.raises(JobConfigError, match="choose one of"):
        make_system("lsf", defaults)


def test_shipped_profiles_are_the_repository_configs_and_all_valid():
    configs = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert configs == ["local-mpi.yaml", "pbs.yaml", "slurm.yaml"]
    shipped = resources.files("launchers").joinpath("profiles")
    for name in configs:
        assert shipped.joinpath(name).read_text() == (REPO / "configs" / name).read_text()
        where, data = load_profile(name[: -len(".yaml")])
        assert data["system"] in ("slurm", "pbs", "local"), where


def test_restart_settings_come_from_the_job_section_and_keyword_arguments(defaults):
    settings = resolve_settings(config=defaults)
    assert (settings.job.restart, settings.job.drain_lead) == (RestartMode.NONE, 120)
    settings = resolve_settings(
        config=defaults, restart="resubmit", drain_lead="5min", max_restarts=2
    )
    assert settings.job.restart is RestartMode.RESUBMIT
    assert (settings.job.drain_lead, settings.job.max_restarts) == (300, 2)


def test_a_restart_mode_a_profile_cannot_have_names_the_valid_ones(defaults, tmp_path):
    path = write(tmp_path / "site.yaml", "job:\n  restart: always\n")
    with pytest.raises(JobConfigError, match="none, requeue, resubmit"):
        resolve_settings(profile=str(path), config=defaults)


def test_a_drain_lead_not_shorter_than_the_walltime_fails_before_anything_is_submitted(defaults):
    with pytest.raises(JobConfigError, match=r"drain_lead 00:02:00 .* walltime 00:01:00"):
        resolve_settings(config=defaults, walltime="00:01:00", restart="requeue")
    settings = resolve_settings(config=defaults, walltime="00:01:00", drain_lead="20s")
    assert settings.job.drain_after == 40
