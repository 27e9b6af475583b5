"""Tests for runtime.config: sources and their priority, set(), validation, show()."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import yaml

import runtime.config
from runtime.config import ConfigStore
from runtime.errors import ConfigError

RUNTIME_DIR = Path(runtime.config.__file__).parent
RUNTIME_DEFAULTS = RUNTIME_DIR / "runtime.yaml"
RUNTIME_SCHEMA = RUNTIME_DIR / "runtime-schema.yaml"
DEFAULT = f"default {RUNTIME_DEFAULTS}"

LAUNCHERS_DEFAULTS = {"launchers": {"slurm": {"queue": None, "cores": 1}}}
LAUNCHERS_SCHEMA = {
    "launchers": {
        "slurm": {
            "queue": {"type": ["str", None], "description": "Partition to submit to."},
            "cores": {"type": "int", "min": 1, "description": "Cores per job."},
        }
    }
}


@pytest.fixture
def store() -> ConfigStore:
    """A store with runtime's defaults and no user files or environment."""
    store = ConfigStore()
    store.register_defaults(RUNTIME_DEFAULTS, RUNTIME_SCHEMA, name="runtime")
    store.refresh(paths=[], env={})
    return store


@pytest.fixture
def restore_global_config():
    """Put the process-wide configuration back as it was after the test."""
    store = runtime.config._STORE
    layers, overrides = store._layers, dict(store._overrides)
    yield
    store._rebuild(layers=layers, overrides=overrides)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


# --- defaults and get ---------------------------------------------------------------


def test_runtime_defaults_load_with_their_file_as_source(store):
    assert store.get("scheduler") is None
    assert store.get("multiprocessing.context") == "spawn"
    assert store.get("serialize.compression-min-size") == "10kB"
    assert store.sources("serialize.compression") == DEFAULT


def test_runtime_defaults_and_schema_list_the_same_keys():
    def default_keys(tree, prefix=""):
        for key, node in tree.items():
            if isinstance(node, dict):
                yield from default_keys(node, f"{prefix}{key}.")
            else:
                yield prefix + key

    def schema_keys(tree, prefix=""):
        for key, node in tree.items():
            if "type" in node:
                yield prefix + key
            else:
                yield from schema_keys(node, f"{prefix}{key}.")

    defaults = yaml.safe_load(RUNTIME_DEFAULTS.read_text())
    schema = yaml.safe_load(RUNTIME_SCHEMA.read_text())
    assert sorted(default_keys(defaults)) == sorted(schema_keys(schema))


def test_get_treats_dash_and_underscore_alike(store):
    assert store.get("num_workers") is store.get("num-workers") is None
    assert store.get("serialize.compression_min_size") == "10kB"


def test_get_returns_sections_without_copying(store):
    assert store.get("serialize") is store.config["serialize"]


def test_get_missing_key_returns_the_default(store):
    assert store.get("no.such.key", default=7) == 7
    assert store.get("serialize.nothing", None) is None


def test_get_override_with_wins_over_the_config(store):
    assert store.get("num-workers", override_with=4) == 4
    assert store.get("no.such.key", override_with="x") == "x"


def test_get_missing_key_names_the_key_and_the_closest_valid_keys(store):
    with pytest.raises(ConfigError) as excinfo:
        store.get("serialize.compresion")
    assert "'serialize.compresion'" in message(excinfo)
    assert "did you mean 'serialize.compression'" in message(excinfo).lower()
    assert "compression-min-size, large-payload-warning" in message(excinfo)


def test_get_key_in_the_wrong_section_suggests_where_it_lives(store):
    with pytest.raises(ConfigError, match=r"Did you mean 'serialize\.compression'"):
        store.get("compression")


def test_get_below_a_value_is_a_missing_key(store):
    with pytest.raises(ConfigError, match="no config key 'scheduler.name'"):
        store.get("scheduler.name")


# --- sources and their priority ------------------------------------------------------


def test_each_source_overrides_the_ones_below_it(tmp_path, store):
    etc = write(
        tmp_path / "etc" / "site.yaml",
        "scheduler: sync\nnum-workers: 2\nmultiprocessing:\n  context: fork\n"
        "serialize:\n  compression: zlib\n",
    )
    user = write(
        tmp_path / "user" / "me.yaml",
        "num-workers: 3\nmultiprocessing:\n  context: forkserver\nserialize:\n  compression: lz4\n",
    )
    named = write(tmp_path / "named.yaml", "serialize:\n  compression: zstd\n")
    env = {
        "HPC_CONFIG": str(named),
        "HPC_SERIALIZE__COMPRESSION_MIN_SIZE": "1kB",
        "HPC_OPTIMIZATION__FUSE": "False",
    }
    store.refresh(paths=[etc.parent, user.parent], env=env)

    assert store.get("tokenize.ensure-deterministic") is False
    assert store.sources("tokenize.ensure-deterministic") == DEFAULT
    assert store.get("scheduler") == "sync"
    assert store.sources("scheduler") == str(etc)
    assert store.get("num-workers") == 3
    assert store.get("multiprocessing.context") == "forkserver"
    assert store.sources("num-workers") == str(user)
    assert store.get("serialize.compression") == "zstd"
    assert store.sources("serialize.compression") == f"{named} (via $HPC_CONFIG)"
    assert store.get("serialize.compression-min-size") == "1kB"
    assert store.sources("serialize.compression-min-size") == "$HPC_SERIALIZE__COMPRESSION_MIN_SIZE"
    assert store.get("optimization.fuse") is False

    with store.set(serialize__compression="none"):
        assert store.get("serialize.compression") == "none"
        assert store.sources("serialize.compression") == "set()"
    assert store.get("serialize.compression") == "zstd"


def test_environment_overrides_hpc_config_file(tmp_path, store):
    named = write(tmp_path / "named.yaml", "scheduler: threads\n")
    store.refresh(paths=[], env={"HPC_CONFIG": str(named), "HPC_SCHEDULER": "processes"})
    assert store.get("scheduler") == "processes"
    assert store.sources("scheduler") == "$HPC_SCHEDULER"


def test_files_in_a_directory_apply_in_name_order_and_only_yaml(tmp_path, store):
    write(tmp_path / "a.yaml", "scheduler: sync\nnum-workers: 2\n")
    write(tmp_path / "b.yml", "scheduler: threads\n")
    write(tmp_path / "c.txt", "this is: [not read\n")
    store.refresh(paths=[tmp_path], env={})
    assert store.get("scheduler") == "threads"
    assert store.get("num-workers") == 2


def test_a_single_path_may_be_given(tmp_path, store):
    store.refresh(paths=write(tmp_path / "a.yaml", "scheduler: sync\n"), env={})
    assert store.get("scheduler") == "sync"


def test_missing_search_directories_are_skipped(tmp_path, store):
    store.refresh(paths=[tmp_path / "absent", tmp_path / "absent.yaml"], env={})
    assert store.get("scheduler") is None


def test_hpc_config_may_name_a_directory(tmp_path, store):
    write(tmp_path / "conf" / "one.yaml", "scheduler: sync\n")
    store.refresh(paths=[], env={"HPC_CONFIG": str(tmp_path / "conf")})
    assert store.get("scheduler") == "sync"
    assert store.sources("scheduler") == f"{tmp_path / 'conf' / 'one.yaml'} (via $HPC_CONFIG)"


def test_hpc_config_naming_a_missing_path_is_an_error(tmp_path, store):
    with pytest.raises(ConfigError, match=r"\$HPC_CONFIG is .*absent.*does not exist"):
        store.refresh(paths=[], env={"HPC_CONFIG": str(tmp_path / "absent")})


def test_empty_file_and_empty_section_change_nothing(tmp_path, store):
    write(tmp_path / "a.yaml", "")
    write(tmp_path / "b.yaml", "serialize:\n  # compression: lz4\n")
    store.refresh(paths=[tmp_path], env={})
    assert store.get("serialize.compression") == "auto"


def test_underscore_keys_in_files_are_canonicalised(tmp_path, store):
    write(tmp_path / "a.yaml", "num_workers: 5\nserialize:\n  compression_min_size: 1MB\n")
    store.refresh(paths=[tmp_path], env={})
    assert store.config["num-workers"] == 5
    assert store.config["serialize"]["compression-min-size"] == "1MB"


def test_dotted_keys_in_files_mean_nested_sections(tmp_path, store):
    write(tmp_path / "a.yaml", "serialize.compression: lz4\n")
    store.refresh(paths=[tmp_path], env={})
    assert store.get("serialize.compression") == "lz4"
    assert store.get("serialize.compression-min-size") == "10kB"


def test_collect_returns_the_configuration_without_installing_it(tmp_path, store):
    write(tmp_path / "a.yaml", "scheduler: sync\n")
    collected = store.collect(paths=[tmp_path], env={"HPC_NUM_WORKERS": "2"})
    assert collected["scheduler"] == "sync"
    assert collected["num-workers"] == 2
    assert collected["serialize"]["compression"] == "auto"
    assert store.get("scheduler") is None


def test_refresh_drops_set_overrides(store):
    store.set(scheduler="sync")
    store.refresh(paths=[], env={})
    assert store.get("scheduler") is None


# --- environment variables ------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "text", "key", "value"),
    [
        ("HPC_NUM_WORKERS", "4", "num-workers", 4),
        ("HPC_NUM_WORKERS", "None", "num-workers", None),
        ("HPC_SCHEDULER", "processes", "scheduler", "processes"),
        ("HPC_SCHEDULER", "'sync'", "scheduler", "sync"),
        ("HPC_OPTIMIZATION__FUSE", "False", "optimization.fuse", False),
        ("HPC_SERIALIZE__COMPRESSION", "none", "serialize.compression", "none"),
        (
            "HPC_SERIALIZE__LARGE_PAYLOAD_WARNING",
            "1 GiB",
            "serialize.large-payload-warning",
            "1 GiB",
        ),
        ("HPC_SERIALIZE__LARGE_PAYLOAD_WARNING", "2000", "serialize.large-payload-warning", 2000),
    ],
)
def test_environment_values_are_python_literals_or_strings(store, variable, text, key, value):
    store.refresh(paths=[], env={variable: text})
    assert store.get(key) == value
    assert type(store.get(key)) is type(value)
    assert store.sources(key) == f"${variable}"


def test_unrelated_environment_variables_are_ignored(store):
    store.refresh(paths=[], env={"HOME": "/nowhere", "HPCX_DIR": "/opt", "hpc_scheduler": "x"})
    assert store.get("scheduler") is None


def test_environment_variable_for_an_unknown_key_names_the_variable(store):
    with pytest.raises(ConfigError) as excinfo:
        store.refresh(paths=[], env={"HPC_SCHEDULR": "sync"})
    assert "$HPC_SCHEDULR" in message(excinfo)
    assert "Did you mean 'scheduler'?" in message(excinfo)
    assert "scheduler, serialize, tokenize" in message(excinfo)


def test_environment_variable_in_a_known_section_for_an_unknown_key_is_an_error(store):
    with pytest.raises(ConfigError, match=r"'serialize\.level' \(from \$HPC_SERIALIZE__LEVEL\)"):
        store.refresh(paths=[], env={"HPC_SERIALIZE__LEVEL": "3"})


def test_environment_value_of_wrong_type_hints_at_python_literals(store):
    with pytest.raises(ConfigError) as excinfo:
        store.refresh(paths=[], env={"HPC_OPTIMIZATION__FUSE": "false"})
    text = message(excinfo)
    assert "'optimization.fuse' (from $HPC_OPTIMIZATION__FUSE) is 'false' (str)" in text
    assert "expected bool" in text
    assert "True, False, None" in text


@pytest.mark.parametrize("variable", ["HPC_", "HPC_SERIALIZE__", "HPC___SCHEDULER"])
def test_environment_variable_naming_no_key_is_an_error(store, variable):
    with pytest.raises(ConfigError, match=f"environment variable {variable} does not name"):
        store.refresh(paths=[], env={variable: "1"})


def test_failed_refresh_leaves_the_configuration_as_it_was(tmp_path, store):
    store.refresh(paths=[], env={"HPC_SCHEDULER": "sync"})
    with pytest.raises(ConfigError):
        store.refresh(paths=[], env={"HPC_SCHEDULER": "threads", "HPC_NUM_WORKERS": "x"})
    assert store.get("scheduler") == "sync"
    assert store.sources("scheduler") == "$HPC_SCHEDULER"


# --- set ------------------------------------------------------------------------------


def test_set_called_plainly_persists(store):
    store.set(scheduler="sync")
    assert store.get("scheduler") == "sync"
    assert store.sources("scheduler") == "set()"


def test_set_kwargs_nest_with_double_underscore_and_dict_keys_with_dots(store):
    with store.set({"serialize.compression": "zlib"}, multiprocessing__context="fork"):
        assert store.get("serialize.compression") == "zlib"
        assert store.get("multiprocessing.context") == "fork"
    assert store.get("serialize.compression") == "auto"
    assert store.get("multiprocessing.context") == "spawn"


def test_set_as_context_manager_restores_values_from_files_and_earlier_set(tmp_path, store):
    write(tmp_path / "a.yaml", "scheduler: threads\n")
    store.refresh(paths=[tmp_path], env={})
    store.set(num_workers=2)
    with store.set(scheduler="sync", num_workers=8):
        assert (store.get("scheduler"), store.get("num-workers")) == ("sync", 8)
    assert (store.get("scheduler"), store.get("num-workers")) == ("threads", 2)
    assert store.sources("scheduler") == str(tmp_path / "a.yaml")
    assert store.sources("num-workers") == "set()"


def test_nested_set_blocks_restore_in_turn(store):
    with store.set(scheduler="sync"):
        with store.set(scheduler="processes"):
            assert store.get("scheduler") == "processes"
        assert store.get("scheduler") == "sync"
    assert store.get("scheduler") is None


def test_set_restores_on_exception(store):
    with pytest.raises(RuntimeError), store.set(scheduler="sync"):
        raise RuntimeError("boom")
    assert store.get("scheduler") is None


def test_set_of_a_section_mapping_keeps_its_other_keys(store):
    with store.set(serialize={"compression": "lz4"}):
        assert store.get("serialize") == {
            "compression": "lz4",
            "compression-min-size": "10kB",
            "large-payload-warning": "10MB",
        }
        with store.set({"serialize.compression": "zstd"}):
            assert store.get("serialize.compression") == "zstd"
        assert store.get("serialize.compression") == "lz4"
    assert store.get("serialize.compression") == "auto"


def test_set_removes_keys_that_did_not_exist_on_exit(store):
    with store.set({"plugin.level.depth": 3}):
        assert store.get("plugin.level.depth") == 3
        assert store.sources("plugin.level.depth") == "set()"
    assert "plugin" not in store.config
    assert store.get("plugin.level.depth", None) is None


def test_set_restores_a_key_added_inside_an_existing_unclaimed_section(store):
    store.set({"plugin.a": 1})
    with store.set({"plugin.b": 2}):
        assert store.get("plugin") == {"a": 1, "b": 2}
    assert store.get("plugin") == {"a": 1}


def test_set_copies_mutable_values(store):
    value = [1, 2]
    with store.set({"plugin.items": value}):
        value.append(3)
        assert store.get("plugin.items") == [1, 2]


def test_set_with_an_unknown_key_names_set_and_changes_nothing(store):
    with pytest.raises(ConfigError) as excinfo:
        store.set(scheduler="sync", serialize__compresion="lz4")
    assert "'serialize.compresion' (from set())" in message(excinfo)
    assert "Valid keys in section 'serialize': compression, compression-min-size" in message(
        excinfo
    )
    assert store.get("scheduler") is None


def test_set_of_a_section_to_a_plain_value_is_an_error(store):
    with pytest.raises(ConfigError, match="'serialize' .* is a section, not a value like 'lz4'"):
        store.set(serialize="lz4")


# --- validation -----------------------------------------------------------------------


def test_unknown_key_in_a_file_names_key_file_valid_keys_and_a_suggestion(tmp_path, store):
    path = write(tmp_path / "a.yaml", "serialize:\n  compresion: lz4\n")
    with pytest.raises(ConfigError) as excinfo:
        store.refresh(paths=[path], env={})
    text = message(excinfo)
    assert f"unknown config key 'serialize.compresion' (from {path})" in text
    assert "Did you mean 'serialize.compression'" in text
    assert (
        "Valid keys in section 'serialize': compression, compression-min-size, large-payload-warning"
        in text
    )


def test_unknown_top_level_value_is_an_error(tmp_path, store):
    path = write(tmp_path / "a.yaml", "workers: 4\n")
    with pytest.raises(
        ConfigError, match=r"'workers' \(from .*a\.yaml\).*Valid keys at the top level"
    ):
        store.refresh(paths=[path], env={})


def test_wrong_type_names_key_source_value_and_expected_type(tmp_path, store):
    path = write(tmp_path / "a.yaml", "num-workers: four\n")
    with pytest.raises(ConfigError) as excinfo:
        store.refresh(paths=[path], env={})
    assert f"'num-workers' (from {path}) is 'four' (str); expected int or null" in message(excinfo)


def test_value_outside_the_choices_lists_them(store):
    with pytest.raises(ConfigError) as excinfo:
        store.set(multiprocessing__context="thread")
    assert "is 'thread'; choose one of: spawn, fork, forkserver" in message(excinfo)


def test_bool_is_not_an_int(store):
    with pytest.raises(ConfigError, match="is True \\(bool\\); expected int or null"):
        store.set(num_workers=True)


def test_number_below_the_minimum_is_an_error(store):
    with pytest.raises(ConfigError, match="'num-workers' .* is 0; it must be at least 1"):
        store.set(num_workers=0)


@pytest.mark.parametrize("value", ["10 parsecs", -1, "lots"])
def test_byte_size_must_parse(store, value):
    with pytest.raises(ConfigError, match="expected a byte size such as '10MB'"):
        store.set(serialize__compression_min_size=value)


def test_malformed_yaml_names_the_file_and_line(tmp_path, store):
    path = write(tmp_path / "bad.yaml", "scheduler: sync\nserialize:\n  compression: [lz4\n")
    with pytest.raises(ConfigError) as excinfo:
        store.refresh(paths=[path], env={})
    text = message(excinfo)
    assert f"config file {path} is not valid YAML at line 4" in text
    assert "flow sequence from line 3" in text


def test_malformed_yaml_indentation_names_the_line(tmp_path, store):
    path = write(tmp_path / "bad.yaml", "scheduler: sync\n num-workers: 2\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML at line 2, column 13"):
        store.refresh(paths=[path], env={})


def test_duplicate_key_in_a_file_names_both_lines(tmp_path, store):
    path = write(tmp_path / "dup.yaml", "scheduler: sync\nnum-workers: 2\nscheduler: threads\n")
    with pytest.raises(
        ConfigError, match=rf"{path} .* line 3.*'scheduler' appears twice \(first at line 1\)"
    ):
        store.refresh(paths=[path], env={})


PACKAGED_YAML = sorted(
    p
    for package in ("runtime", "launchers", "hpc")
    for p in (RUNTIME_DIR.parent / package).rglob("*.yaml")
)


@pytest.mark.parametrize("path", PACKAGED_YAML, ids=lambda p: p.name)
def test_packaged_yaml_reads_the_same_with_the_fast_parser(path):
    fast = runtime.config._read_yaml(path, "defaults file", fast=True)
    assert fast == runtime.config._read_yaml(path, "defaults file")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("scheduler: sync\nnum-workers: 2\nscheduler: threads\n", "'scheduler' appears twice"),
        ("scheduler: sync\n num-workers: 2\n", "not valid YAML at line 2, column 13"),
    ],
)
def test_bad_defaults_file_is_reported_as_any_other_file(tmp_path, store, text, expected):
    path = write(tmp_path / "defaults.yaml", text)
    with pytest.raises(ConfigError, match=expected) as excinfo:
        store.register_defaults(path, RUNTIME_SCHEMA, name="other")
    with pytest.raises(ConfigError) as as_user_file:
        store.refresh(paths=[path], env={})
    assert message(excinfo).replace("defaults file", "config file") == message(as_user_file)


@pytest.mark.parametrize("text", ["- scheduler: sync\n", "just a string\n", "42\n"])
def test_file_whose_top_level_is_not_a_mapping_is_an_error(tmp_path, store, text):
    path = write(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError, match=rf"config file {path} must map keys to values"):
        store.refresh(paths=[path], env={})


def test_non_string_key_is_an_error(tmp_path, store):
    path = write(tmp_path / "a.yaml", "serialize:\n  1: x\n")
    with pytest.raises(ConfigError, match=r"config key 1 in section 'serialize' .* is not a name"):
        store.refresh(paths=[path], env={})


def test_validate_checks_a_mapping_under_the_given_source_name(store):
    store.validate({"serialize": {"compression": "zlib"}}, source="profile gpu.yaml")
    with pytest.raises(ConfigError, match=r"'scheduler' \(from profile gpu\.yaml\)"):
        store.validate({"scheduler": "fast"}, source="profile gpu.yaml")


# --- sections no package has registered yet -----------------------------------------


def test_unregistered_section_is_held_until_its_package_registers(tmp_path, store):
    path = write(tmp_path / "a.yaml", "launchers:\n  slurm:\n    queue: gpu\n")
    store.refresh(paths=[path], env={})
    assert store.get("launchers.slurm.queue") == "gpu"
    assert "launchers:  # not checked: no loaded package registers this section" in store.show()

    store.register_defaults(LAUNCHERS_DEFAULTS, LAUNCHERS_SCHEMA, name="launchers")
    assert store.get("launchers.slurm") == {"queue": "gpu", "cores": 1}
    assert store.sources("launchers.slurm.queue") == str(path)
    assert store.sources("launchers.slurm.cores") == "default (launchers)"
    assert "not checked" not in store.show()


def test_registering_a_package_validates_the_users_held_values(tmp_path, store):
    path = write(tmp_path / "a.yaml", "launchers:\n  slurm:\n    qeue: gpu\n")
    store.refresh(paths=[path], env={})
    with pytest.raises(ConfigError) as excinfo:
        store.register_defaults(LAUNCHERS_DEFAULTS, LAUNCHERS_SCHEMA, name="launchers")
    assert f"'launchers.slurm.qeue' (from {path})" in message(excinfo)
    assert "Did you mean 'launchers.slurm.queue'" in message(excinfo)
    assert "launchers" not in store._packages  # the failed registration left no trace


def test_unregistered_section_close_to_a_registered_one_is_a_typo(store):
    with pytest.raises(ConfigError, match=r"'serialise' \(from \$HPC_SERIALISE__COMPRESSION\)"):
        store.refresh(paths=[], env={"HPC_SERIALISE__COMPRESSION": "lz4"})


def test_validate_reports_sections_no_package_registered(store):
    store.refresh(paths=[], env={"HPC_PLUGIN__LEVEL": "3"})
    store.validate(allow_unclaimed=True)
    with pytest.raises(
        ConfigError, match=r"no loaded package registers: 'plugin' \(from \$HPC_PLUGIN__LEVEL\)"
    ):
        store.validate()


def test_validate_mapping_refuses_unregistered_sections_unless_allowed(store):
    store.validate({"plugin": {"x": 1}}, allow_unclaimed=True)
    with pytest.raises(ConfigError, match="unknown config key 'plugin' \\(from validate\\(\\)\\)"):
        store.validate({"plugin": {"x": 1}})


# --- register_defaults ----------------------------------------------------------------


def test_register_defaults_keeps_user_files_environment_and_set_values(tmp_path, store):
    write(tmp_path / "a.yaml", "scheduler: threads\n")
    store.refresh(paths=[tmp_path], env={"HPC_NUM_WORKERS": "3"})
    store.set(serialize__compression="zlib")
    store.register_defaults(LAUNCHERS_DEFAULTS, LAUNCHERS_SCHEMA, name="launchers")
    assert store.get("scheduler") == "threads"
    assert store.get("num-workers") == 3
    assert store.get("serialize.compression") == "zlib"
    assert store.get("launchers.slurm.cores") == 1


def test_register_defaults_from_yaml_files(tmp_path, store):
    defaults = write(tmp_path / "pkg.yaml", "pkg:\n  retries: 2\n")
    schema = write(
        tmp_path / "pkg-schema.yaml",
        "pkg:\n  retries:\n    type: int\n    description: How often to retry.\n",
    )
    store.register_defaults(defaults, schema)
    assert store.get("pkg.retries") == 2
    assert store.sources("pkg.retries") == f"default {defaults}"


def test_register_defaults_twice_under_one_name_replaces(store):
    store.register_defaults(LAUNCHERS_DEFAULTS, LAUNCHERS_SCHEMA, name="launchers")
    changed = {"launchers": {"slurm": {"queue": "batch", "cores": 1}}}
    store.register_defaults(changed, LAUNCHERS_SCHEMA, name="launchers")
    assert store.get("launchers.slurm.queue") == "batch"


def test_register_defaults_refuses_a_key_owned_by_another_package(store):
    schema = {"scheduler": {"type": "str", "description": "Mine."}}
    with pytest.raises(ConfigError, match="'scheduler' is defined by both runtime and thief"):
        store.register_defaults({"scheduler": "x"}, schema, name="thief")
    assert store.get("scheduler") is None


def test_register_defaults_refuses_a_schema_key_without_a_default(store):
    with pytest.raises(ConfigError, match="lists 'launchers.slurm.cores' but default"):
        store.register_defaults(
            {"launchers": {"slurm": {"queue": None}}}, LAUNCHERS_SCHEMA, name="launchers"
        )


def test_register_defaults_refuses_a_default_missing_from_the_schema(store):
    defaults = {"launchers": {"slurm": {"queue": None, "cores": 1, "memory": "1GB"}}}
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'launchers.slurm.memory' \(from default \(launchers\)\)",
    ):
        store.register_defaults(defaults, LAUNCHERS_SCHEMA, name="launchers")


def test_register_defaults_refuses_a_default_of_the_wrong_type(store):
    defaults = {"launchers": {"slurm": {"queue": None, "cores": "many"}}}
    with pytest.raises(ConfigError, match="'launchers.slurm.cores' .* expected int"):
        store.register_defaults(defaults, LAUNCHERS_SCHEMA, name="launchers")


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"type": "integer", "description": "x"}, "has unknown types \\['integer'\\]"),
        ({"type": "int"}, "needs a one-line 'description:'"),
        ({"type": "int", "description": "x", "default": 1}, "has unknown fields \\['default'\\]"),
        (
            {"type": "str", "choices": [1], "description": "x"},
            "has choices \\[1\\] that are not str",
        ),
    ],
)
def test_malformed_schema_is_an_error_naming_the_key(store, spec, complaint):
    with pytest.raises(ConfigError, match=f"schema \\(pkg\\): key 'pkg.k' {complaint}"):
        store.register_defaults({"pkg": {"k": 1}}, {"pkg": {"k": spec}}, name="pkg")


def test_register_defaults_with_a_mapping_needs_a_name(store):
    with pytest.raises(TypeError, match="needs name="):
        store.register_defaults({}, {})


# --- show -----------------------------------------------------------------------------


def test_show_is_yaml_of_the_config_with_each_source_as_a_comment(tmp_path, store):
    write(tmp_path / "a.yaml", "multiprocessing:\n  context: fork\n")
    store.refresh(paths=[tmp_path], env={"HPC_SCHEDULER": "processes"})
    with store.set({"serialize.compression": "none"}):
        text = store.show()
        assert yaml.safe_load(text) == store.config
    assert "scheduler: processes  # $HPC_SCHEDULER\n" in text
    assert f"  context: fork  # {tmp_path / 'a.yaml'}\n" in text
    assert "  compression: none  # set()\n" in text
    assert f"  compression-min-size: 10kB  # {DEFAULT}\n" in text


def test_show_quotes_values_yaml_would_misread(store):
    with store.set({"plugin": {"word": "null", "lines": "a\nb", "items": ["x", "y z"]}}):
        text = store.show("plugin")
        assert yaml.safe_load(text) == {"plugin": store.get("plugin")}


def test_show_of_one_key_or_section(store):
    assert store.show("multiprocessing") == f"multiprocessing:\n  context: spawn  # {DEFAULT}\n"
    assert store.show("scheduler") == f"scheduler: null  # {DEFAULT}\n"


def test_sources_of_a_section_is_an_error_listing_its_keys(store):
    with pytest.raises(
        ConfigError, match="'multiprocessing' is a section; .*multiprocessing.context"
    ):
        store.sources("multiprocessing")


# --- concurrency ----------------------------------------------------------------------


def test_readers_never_see_a_half_installed_configuration(store):
    """get() from many threads while another thread sets and refreshes."""
    allowed = {("auto", "10kB"), ("lz4", "1MB"), ("zlib", "2MB")}
    stop = threading.Event()
    start = threading.Barrier(5)
    errors: list[BaseException] = []

    def read() -> None:
        start.wait()
        try:
            while not stop.is_set():
                # One section is replaced in one assignment: both values are one version's.
                section = store.get("serialize")
                pair = (section["compression"], section["compression-min-size"])
                assert pair in allowed, pair
                assert store.get("multiprocessing.context") == "spawn"
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, inside installs too
    for thread in readers:
        thread.start()
    try:
        start.wait()
        for _ in range(200):
            with store.set(serialize={"compression": "lz4", "compression-min-size": "1MB"}):
                pass
            store.refresh(
                paths=[],
                env={
                    "HPC_SERIALIZE__COMPRESSION": "zlib",
                    "HPC_SERIALIZE__COMPRESSION_MIN_SIZE": "2MB",
                },
            )
            store.refresh(paths=[], env={})
    finally:
        stop.set()
        for thread in readers:
            thread.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[0]


# --- the process-wide configuration ---------------------------------------------------


def test_module_set_changes_module_get_and_restores(restore_global_config):
    runtime.config.refresh(paths=[], env={})
    with runtime.config.set(scheduler="sync", serialize__compression="zlib"):
        assert runtime.config.get("scheduler") == "sync"
        assert runtime.config.config["serialize"]["compression"] == "zlib"
        assert runtime.config.sources("scheduler") == "set()"
    assert runtime.config.get("scheduler") is None
    assert runtime.config.get("serialize.compression") == "auto"


def test_module_refresh_reads_the_given_paths_and_environment(tmp_path, restore_global_config):
    write(tmp_path / "a.yaml", "num-workers: 6\n")
    config_dict = runtime.config.config
    runtime.config.refresh(paths=[tmp_path], env={"HPC_SCHEDULER": "threads"})
    assert runtime.config.config is config_dict  # same object: importers keep a live view
    assert runtime.config.get("num-workers") == 6
    assert runtime.config.get("scheduler") == "threads"
    assert runtime.config.collect(paths=[], env={})["num-workers"] is None
    assert "scheduler: threads  # $HPC_SCHEDULER" in runtime.config.show()


def test_module_public_surface_is_sorted_and_resolves():
    assert runtime.config.__all__ == sorted(runtime.config.__all__)
    for name in runtime.config.__all__:
        assert getattr(runtime.config, name) is not None
