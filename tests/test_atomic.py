"""fastkd.atomic: the file appears whole or not at all, with the mode a plain open() gives, and
the folder is fsynced after the rename so the rename survives a power loss."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fastkd import atomic
from fastkd.atomic import atomic_write, atomic_write_bytes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_new_file_mode_is_what_open_gives(tmp_path, umask, mask, expected):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "manifest.json", b"{}\n")
    assert _mode(tmp_path / "manifest.json") == expected == _mode(plain)


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    path.chmod(0o600)  # the user made it private: a rewrite must not open it up
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o600


def test_folder_fsynced_after_rename(tmp_path, monkeypatch):
    calls = []  # (is a folder, the target already renamed into place)
    real_fsync = os.fsync

    def spy(fd):
        calls.append((stat.S_ISDIR(os.fstat(fd).st_mode), (tmp_path / "r.json").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_bytes(tmp_path / "r.json", b"1")
    assert calls == [(False, False), (True, True)]  # the file's data first, then the folder


def test_folder_fsync_refused_is_quiet(tmp_path, monkeypatch):
    def refuse(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # e.g. a file system that cannot fsync a folder
        return None

    monkeypatch.setattr(os, "fsync", refuse)
    atomic_write_bytes(tmp_path / "r.json", b"1")
    assert (tmp_path / "r.json").read_bytes() == b"1"


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_fsync_dir_skips_unopenable_folder(tmp_path):
    atomic.fsync_dir(tmp_path / "missing")  # no exception: nothing to make durable
