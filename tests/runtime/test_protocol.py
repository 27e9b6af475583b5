"""Tests for runtime.protocol: message kinds and the version check between peers."""

from __future__ import annotations

import logging
import pickle
import sys
import zipfile

import pytest

from runtime import config, protocol
from runtime.errors import VersionMismatchError
from runtime.protocol import Op, Role, check_versions, version_differences, versions

# The ops the shared design (issue 3) names; scheduler, worker and client are written
# against these strings.
SPEC_OPS = {
    "register-client", "update-graph", "release-keys", "cancel-keys", "who-has",
    "update-data", "scheduler-info", "retire-workers", "shutdown", "close-client",
    "key-in-memory", "task-erred", "task-cancelled", "lost-data", "register-worker",
    "task-finished", "missing-data", "heartbeat", "release-worker-data", "compute-task",
    "free-keys", "close", "get-data", "data", "run",
}  # fmt: skip


def test_every_op_of_the_design_exists():
    missing = SPEC_OPS - {op.value for op in Op}
    assert not missing


def test_ops_compare_and_hash_equal_to_their_strings():
    handlers = {"compute-task": "handled"}
    assert Op.COMPUTE_TASK == "compute-task"
    assert handlers[Op.COMPUTE_TASK] == "handled"
    by_op: dict[str, int] = {Op.FREE_KEYS: 1}
    assert by_op["free-keys"] == 1
    assert f"{Op.FREE_KEYS}" == str(Op.FREE_KEYS) == "free-keys"


def test_op_values_are_unique_kebab_case():
    values = [op.value for op in Op]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and "_" not in v and " " not in v for v in values)


def test_ops_survive_pickling_as_themselves():
    msg = {"op": Op.TASK_FINISHED, "key": ("x", 1)}
    assert pickle.loads(pickle.dumps(msg, protocol=5))["op"] is Op.TASK_FINISHED


def test_roles_are_the_three_process_kinds():
    assert {r.value for r in Role} == {"scheduler", "worker", "client"}


def test_versions_reports_python_and_the_checked_packages():
    found = versions()
    assert set(found) == {"python", "hpc-toolkit", "cloudpickle", "numpy", "pandas"}
    assert str(found["python"]).count(".") == 2
    assert found["cloudpickle"]
    found["python"] = "mutated"
    assert versions()["python"] != "mutated"  # callers get a copy


def test_version_differences_lists_each_mismatch_readably():
    local = {"python": "3.11.7", "numpy": "1.26.4", "pandas": None, "cloudpickle": "3.0.0"}
    remote = {"python": "3.11.7", "numpy": "2.0.1", "pandas": "2.2.0", "cloudpickle": "3.0.0"}
    assert version_differences(local, remote) == [
        "numpy: 1.26.4 here, 2.0.1 on the peer",
        "pandas: not installed here, 2.2.0 on the peer",
    ]
    assert version_differences(local, dict(local)) == []


def test_check_versions_raises_listing_differences_and_the_fix():
    local = {"python": "3.11.7", "numpy": "1.26.4"}
    remote = {"python": "3.12.1", "numpy": "1.26.4"}
    with pytest.raises(VersionMismatchError) as info:
        check_versions(local, remote, peer="worker tcp://127.0.0.1:1234", mode="error")
    message = str(info.value)
    assert "worker tcp://127.0.0.1:1234" in message
    assert "python: 3.11.7 here, 3.12.1 on the peer" in message
    assert "distributed.version-mismatch: warn" in message


def test_check_versions_in_warn_mode_logs_and_returns_differences(caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.protocol"):
        found = check_versions({"numpy": "1"}, {"numpy": "2"}, peer="client c1", mode="warn")
    assert found == ["numpy: 1 here, 2 on the peer"]
    assert "client c1" in caplog.text


def test_check_versions_follows_the_config_when_no_mode_is_given(caplog):
    with config.set({"distributed.version-mismatch": "warn"}):
        assert check_versions({"numpy": "1"}, {"numpy": "2"}, peer="p")
    with pytest.raises(VersionMismatchError):
        check_versions({"numpy": "1"}, {"numpy": "2"}, peer="p")  # default: error


def test_matching_versions_pass_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.protocol"):
        assert check_versions(versions(), versions(), peer="p", mode="error") == []
    assert not caplog.records


def test_public_surface_is_sorted_and_complete():
    assert protocol.__all__ == sorted(protocol.__all__)
    assert all(hasattr(protocol, name) for name in protocol.__all__)


def _dist(where, dirname, metadata_file, version):
    info = where / dirname
    info.mkdir(parents=True)
    (info / metadata_file).write_text(
        f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {version}\n\nSummary-in-body: no\n"
    )
    return info


def _metadata_version(name):
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_package_versions_agree_with_importlib_metadata():
    for name in (*protocol._CHECKED_PACKAGES, "pytest", "PyYAML", "no-such-package-xyz"):
        assert protocol._package_version(name) == _metadata_version(name), name


def test_package_version_takes_the_first_install_along_sys_path(tmp_path, monkeypatch):
    _dist(tmp_path / "a", "Fake_Pkg-1.0.dist-info", "METADATA", "1.0")
    _dist(tmp_path / "b", "fake_pkg-2.0.dist-info", "METADATA", "2.0")
    _dist(tmp_path / "c", "fake.pkg.egg-info", "PKG-INFO", "3.0")
    monkeypatch.setattr(
        sys, "path", [str(tmp_path / "missing"), str(tmp_path / "b"), str(tmp_path / "a")]
    )
    assert protocol._package_version("fake-pkg") == "2.0" == _metadata_version("fake-pkg")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "c"), str(tmp_path / "a")])
    assert protocol._package_version("fake_pkg") == "3.0" == _metadata_version("fake_pkg")


def test_package_version_in_a_zip_archive_is_found_through_importlib(tmp_path, monkeypatch):
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fakepkg-4.2.dist-info/METADATA", "Name: fakepkg\nVersion: 4.2\n")
    monkeypatch.setattr(sys, "path", [str(archive)])
    with pytest.raises(protocol._Unsure):
        protocol._version_from_path("fakepkg")
    assert protocol._package_version("fakepkg") == "4.2"
