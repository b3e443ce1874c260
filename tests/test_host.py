"""The per-user cache folder, the CPU's identity and atomic writes (switchsae/host.py)."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest

from switchsae import host


@pytest.fixture
def fresh_root(monkeypatch, tmp_path):
    """An empty private temp folder, and no cache root remembered from other tests."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    host._cache_root.cache_clear()
    yield tmp_path / "tmp" / f"switchsae-{os.getuid()}"
    host._cache_root.cache_clear()


def test_the_cache_variable_wins_and_an_empty_one_counts_as_unset(monkeypatch, tmp_path, fresh_root):
    monkeypatch.setenv("SWITCHSAE_CACHE", str(tmp_path / "mine"))
    assert host.cache_dir("native") == tmp_path / "mine" / "native"
    assert (tmp_path / "mine" / "native").is_dir()
    monkeypatch.setenv("SWITCHSAE_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert host.cache_dir("x") == tmp_path / "home" / ".cache" / "switchsae" / "x"


@pytest.mark.parametrize("home", ["a-file", "a-file/home"], ids=["home is a file", "home under a file"])
def test_an_unusable_home_falls_back_to_a_private_temp_folder_with_one_warning(monkeypatch, tmp_path, fresh_root,
                                                                               home):
    """(Paths under a file fail for root too, unlike a chmod-ed folder.)"""
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.delenv("SWITCHSAE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / home))
    with pytest.warns(UserWarning, match="unusable.*using"):
        assert host.cache_dir("native") == fresh_root / "native"
    assert fresh_root.stat().st_mode & 0o777 == 0o700
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        host.cache_dir("again")  # the choice is remembered: no second warning


def test_no_home_at_all_still_gives_a_folder(monkeypatch, fresh_root):
    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")  # what Path.home() raises then

    monkeypatch.delenv("SWITCHSAE_CACHE", raising=False)
    monkeypatch.setattr(host.Path, "home", classmethod(no_home))
    with pytest.warns(UserWarning, match="using"):
        assert host.cache_dir() == fresh_root


def test_cpu_identity_reads_x86_and_arm_cpuinfo_and_survives_none(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(host, "CPUINFO", info)
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f\n\nprocessor\t: 1\n")
    assert host.cpu_identity() == ("AMD EPYC", "fpu avx512f")
    info.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: fpu\n")
    assert host.cpu_identity() == ("AMD EPYC (family 26, model 2)", "fpu")
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    assert host.cpu_identity() == ("0xd40", "fp asimd sve")
    info.unlink()
    assert host.cpu_identity()[1] == ""


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "decision.json"
    host.write_text_atomic(path, "{}\n")
    host.write_text_atomic(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["decision.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
