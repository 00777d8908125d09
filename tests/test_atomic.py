"""Atomic writes: file modes follow the umask, errors name the user's path."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
import torch

from layerprobe import atomic
from layerprobe.atomic import (
    atomic_torch_save,
    atomic_write_text,
    check_writable,
    current_umask,
)
from layerprobe.plots import plot_layerwise
from layerprobe.results import Result, save_results


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(saved)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _result() -> Result:
    return Result("m.pt", "m", "bundled", "word", "pwcca", [0, 1], [0.1, 0.2])


def test_outputs_get_the_umask_mode(tmp_path, umask):
    umask(0o022)
    assert current_umask() == 0o022
    written = [
        atomic_write_text(tmp_path / "a.txt", "hello\n"),
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "it1" / "ckpt.pt"),
        save_results([_result()], tmp_path / "r.json"),
        plot_layerwise([_result()], tmp_path / "fig.png"),
    ]
    assert [oct(_mode(p)) for p in written] == [oct(0o644)] * len(written)
    umask(0o077)
    assert _mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600


def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "r.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o640


def test_write_errors_name_the_users_path_not_the_temp_file(tmp_path, monkeypatch):
    def refuse(*, prefix, suffix, dir):
        raise PermissionError(1, "Operation not permitted", os.path.join(dir, prefix + "x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    target = tmp_path / "ro" / "r.json"
    for call in (lambda: atomic_write_text(target, "x"), lambda: check_writable(target)):
        with pytest.raises(PermissionError) as caught:
            call()
        assert str(caught.value) == f"{target}: cannot write (Operation not permitted)"
        assert ".tmp" not in str(caught.value)


def test_failing_writer_leaves_nothing_and_names_the_path(tmp_path):
    def disk_full(handle):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="r.bin: cannot write \\(No space left on device\\)"):
        atomic.atomic_write(tmp_path / "r.bin", disk_full)
    assert list(tmp_path.iterdir()) == []


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_writable(tmp_path / "new")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{blocker / 'r.json'}: cannot write "
                       f"\\({blocker} is a file, not a folder\\)"):
        check_writable(blocker / "r.json")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        atomic_write_text(blocker / "sub" / "r.json", "x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"{ro / 'r.json'}: cannot write"):
            check_writable(ro / "r.json")
    finally:
        ro.chmod(0o755)
