"""Where a cluster's settings come from: config, a site profile, keyword arguments.

Lowest to highest priority::

    launchers/launchers.yaml      package defaults, registered with runtime.config on
                                  import (so HPC_LAUNCHERS__... and user files apply)
    user config                   ~/.config/hpc/*.yaml, /etc/hpc/*.yaml, $HPC_CONFIG,
                                  HPC_LAUNCHERS__JOB__QUEUE=..., hpc.config.set(...)
    profile                       a named site profile: the contents of a `launchers:`
                                  section in its own file, e.g. configs/slurm.yaml
    keyword arguments             SlurmCluster(queue="debug", walltime="00:10:00")

Profiles are looked up by name in ``launchers.profile-path`` (default
``~/.config/hpc/profiles``, ``/etc/hpc/profiles``), then among the profiles shipped
inside the package (``launchers/profiles/``, the same files as the repository's
``configs/``), so they work after a normal, non-editable install. A path to a YAML
file works too. Profiles are checked against the same schema as the config; unknown
keys are errors that list the valid ones.

State: importing this module registers the package defaults with
:mod:`runtime.config` (once per process). Everything else is computed per call; the
loaders take ``config=`` so tests never touch the process-wide configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from launchers._commands import Retry, Runner
from launchers._errors import JobConfigError
from launchers._local import LocalSystem
from launchers._pbs import PBSSystem
from launchers._slurm import SlurmSystem
from launchers._spec import JobSpec
from launchers._system import JobSystem
from runtime import config as runtime_config
from runtime.errors import ConfigError
from runtime.units import parse_timedelta

__all__ = [
    "SYSTEMS",
    "LauncherSettings",
    "available_profiles",
    "find_profile",
    "load_profile",
    "make_system",
    "resolve_settings",
]

#: Job systems by the name profiles and the command line use.
SYSTEMS: dict[str, type[JobSystem]] = {
    "slurm": SlurmSystem,
    "pbs": PBSSystem,
    "local": LocalSystem,
}

_PACKAGE = resources.files("launchers")
runtime_config.register_defaults(
    Path(str(_PACKAGE.joinpath("launchers.yaml"))),
    Path(str(_PACKAGE.joinpath("launchers-schema.yaml"))),
    name="launchers",
)

# Keyword arguments other than job settings: name -> (section, key) in `launchers`.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "dialect": ("pbs", "dialect"),
    "submit_retries": ("submit", "retries"),
    "retry_delay": ("submit", "retry-delay"),
    "max_retry_delay": ("submit", "max-retry-delay"),
    "command_timeout": ("submit", "command-timeout"),
    "status_min_interval": ("status", "min-interval"),
    "status_max_interval": ("status", "max-interval"),
    "status_backoff": ("status", "backoff"),
    "scheduler_file": ("cluster", "scheduler-file"),
    "start_timeout": ("cluster", "start-timeout"),
}


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    """Everything a cluster needs, resolved and checked.

    Attributes
    ----------
    system
        ``"slurm"``, ``"pbs"`` or ``"local"``.
    job
        The job settings (a fresh :class:`JobSpec`, the caller's to change).
    profile
        The profile applied (its name or path), or ``None``.
    section
        The merged ``launchers`` section the rest was read from.
    """

    system: str
    job: JobSpec
    profile: str | None
    section: Mapping[str, Any] = dataclasses.field(repr=False)

    def seconds(self, *path: str) -> float | None:
        """A duration setting in seconds, e.g. ``seconds("status", "min-interval")``."""
        value: Any = self.section
        for part in path:
            value = value[part]
        return parse_timedelta(value)

    def value(self, *path: str) -> Any:
        """A setting as configured, e.g. ``value("pbs", "dialect")``."""
        node: Any = self.section
        for part in path:
            node = node[part]
        return node

    def make_system(
        self, *, runner: Runner | None = None, sleep: Callable[[float], None] | None = None
    ) -> JobSystem:
        """Build the job system these settings describe."""
        return make_system(self.system, self.section, runner=runner, sleep=sleep)


def make_system(
    name: str,
    section: Mapping[str, Any] | None = None,
    *,
    runner: Runner | None = None,
    sleep: Callable[[float], None] | None = None,
) -> JobSystem:
    """Build a job system by name with the submit/PBS settings of a ``launchers`` section.

    Parameters
    ----------
    name
        ``"slurm"``, ``"pbs"`` or ``"local"``.
    section
        The ``launchers`` config section; default: the process-wide config.
    runner, sleep
        Replace the command runner and the back-off sleep (tests).
    """
    if name not in SYSTEMS:
        raise JobConfigError(f"unknown job system {name!r}; choose one of: {', '.join(SYSTEMS)}")
    section = section if section is not None else runtime_config.get("launchers")
    submit = section["submit"]
    retry = Retry(
        retries=int(submit["retries"]),
        delay=parse_timedelta(submit["retry-delay"]) or 0.0,
        max_delay=parse_timedelta(submit["max-retry-delay"]) or 0.0,
    )
    if sleep is not None:
        retry = dataclasses.replace(retry, sleep=sleep)
    options: dict[str, Any] = {
        "runner": runner,
        "retry": retry,
        "command_timeout": parse_timedelta(submit["command-timeout"]),
    }
    if name == "pbs":
        options["dialect"] = section["pbs"]["dialect"]
    return SYSTEMS[name](**options)


def _canonical_keys(data: Any) -> Any:
    """Section keys with ``_`` written as ``-``, the config's canonical spelling."""
    if isinstance(data, Mapping):
        return {str(k).replace("_", "-"): _canonical_keys(v) for k, v in data.items()}
    return data


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _shipped_profiles() -> Any:
    return _PACKAGE.joinpath("profiles")


def available_profiles(search_path: Sequence[str | os.PathLike[str]] = ()) -> dict[str, str]:
    """Return the profiles that can be used by name: ``{name: where}``.

    Earlier directories win over later ones and over the shipped profiles.
    """
    found: dict[str, str] = {}
    for directory in search_path:
        folder = Path(directory).expanduser()
        if folder.is_dir():
            for file in sorted(folder.glob("*.yaml")):
                found.setdefault(file.stem, str(file))
    shipped = _shipped_profiles()
    if shipped.is_dir():
        for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".yaml"):
                found.setdefault(entry.name[: -len(".yaml")], f"shipped:{entry.name}")
    return found


def find_profile(name: str, search_path: Sequence[str | os.PathLike[str]] = ()) -> tuple[str, str]:
    """Return ``(where, text)`` of a profile given by name or by path.

    Raises
    ------
    JobConfigError
        No such profile; the message lists the ones there are.
    """
    looks_like_path = name.endswith((".yaml", ".yml")) or os.sep in name
    if looks_like_path:
        path = Path(name).expanduser()
        try:
            return str(path), path.read_text(encoding="utf-8")
        except OSError as exc:
            raise JobConfigError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    for directory in search_path:
        path = Path(directory).expanduser() / f"{name}.yaml"
        if path.is_file():
            return str(path), path.read_text(encoding="utf-8")
    shipped = _shipped_profiles().joinpath(f"{name}.yaml")
    if shipped.is_file():
        return f"shipped profile {name}.yaml", shipped.read_text(encoding="utf-8")
    known = ", ".join(available_profiles(search_path)) or "none"
    dirs = ", ".join(str(d) for d in search_path) or "no directories"
    raise JobConfigError(
        f"no profile named {name!r} (searched {dirs} and the shipped profiles); "
        f"available: {known}. Pass a path to a YAML file, or copy one from configs/"
    )


def load_profile(
    name: str, search_path: Sequence[str | os.PathLike[str]] = ()
) -> tuple[str, dict[str, Any]]:
    """Read and check a profile; return ``(where, contents of its launchers section)``.

    Raises
    ------
    JobConfigError
        The profile is missing, not YAML, or has unknown keys or bad values.
    """
    where, text = find_profile(name, search_path)
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f" at line {mark.line + 1}" if mark else ""
        raise JobConfigError(f"profile {where} is not valid YAML{line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise JobConfigError(f"profile {where} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise JobConfigError(
            f"profile {where} must be a mapping of settings such as 'system: slurm'"
        )
    data = _canonical_keys(data)
    try:
        runtime_config.validate({"launchers": data}, source=f"profile {where}")
    except ConfigError as exc:
        raise JobConfigError(str(exc)) from None
    return where, data


def resolve_settings(
    *,
    system: str | None = None,
    profile: str | None = None,
    config: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> LauncherSettings:
    """Merge config, profile and keyword arguments into checked settings.

    Parameters
    ----------
    system
        The job system the caller needs (``SlurmCluster`` passes ``"slurm"``); a
        profile for another system is then an error. ``None``: the profile's, else
        the config's ``launchers.system``.
    profile
        Profile name or path; ``None``: ``launchers.profile`` from the config.
    config
        The ``launchers`` section to start from; default: the process-wide config.
    **overrides
        Job settings (``queue=``, ``walltime=``, ...; see :class:`JobSpec`) and
        ``dialect``, ``submit_retries``, ``retry_delay``, ``max_retry_delay``,
        ``command_timeout``, ``status_min_interval``, ``status_max_interval``,
        ``status_backoff``, ``scheduler_file``, ``start_timeout``.

    Raises
    ------
    JobConfigError
        Unknown keyword (the message lists the valid ones), a bad value, settings
        that cannot work together (a ``drain_lead`` not shorter than the walltime), a
        missing or invalid profile, or a profile for another job system.
    """
    section: dict[str, Any] = copy.deepcopy(
        dict(config if config is not None else runtime_config.get("launchers"))
    )
    profile = profile if profile is not None else section.get("profile")
    where: str | None = None
    profile_system: str | None = None
    if profile:
        where, data = load_profile(profile, section.get("profile-path") or ())
        profile_system = data.get("system")
        _deep_merge(section, data)
    if system is not None and system not in SYSTEMS:
        raise JobConfigError(f"unknown job system {system!r}; choose one of: {', '.join(SYSTEMS)}")
    if system is not None and profile_system is not None and profile_system != system:
        raise JobConfigError(
            f"profile {where} is for {profile_system} jobs, not {system}; pick a {system} "
            f"profile, or use the cluster class for {profile_system}"
        )
    chosen = system or section["system"]

    job_values: dict[str, Any] = {}
    option_values: dict[str, Any] = {}
    for key, value in overrides.items():
        canonical = key.replace("-", "_")
        if canonical in _OPTIONS:
            option_values[canonical] = os.fspath(value) if isinstance(value, os.PathLike) else value
        elif canonical in JobSpec.FIELDS:
            job_values[canonical] = value
        else:
            valid = ", ".join(sorted([*JobSpec.FIELDS, *_OPTIONS, "profile"]))
            raise JobConfigError(f"unknown setting {key!r}; valid settings are: {valid}")
    for key, value in option_values.items():
        sect, name = _OPTIONS[key]
        try:
            runtime_config.validate({"launchers": {sect: {name: value}}}, source=f"argument {key}=")
        except ConfigError as exc:
            raise JobConfigError(str(exc)) from None
        section[sect][name] = value

    spec = JobSpec(**{k: v for k, v in section["job"].items()})
    spec.update(job_values)
    spec.check()
    section["system"] = chosen
    return LauncherSettings(chosen, spec, where, section)
