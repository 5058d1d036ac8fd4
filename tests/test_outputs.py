"""gptoss.outputs: every output path is checked before work starts, and written atomically."""
import errno
import os
import stat
import tempfile

import pytest

from gptoss.outputs import OutputPathError, check_output_path, write_atomically, write_lines


def test_a_new_file_in_an_existing_folder_is_fine(tmp_path):
    assert check_output_path(tmp_path / "out.txt") == tmp_path / "out.txt"
    assert not (tmp_path / "out.txt").exists()
    assert list(tmp_path.iterdir()) == []  # the writability probe leaves nothing behind


def test_an_existing_file_needs_force(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("mine\n")
    with pytest.raises(OutputPathError, match=r"out.txt exists; pass --force to overwrite it"):
        check_output_path(out)
    assert check_output_path(out, force=True) == out
    assert out.read_text() == "mine\n"  # checking writes nothing


def test_an_input_is_refused_even_with_force(tmp_path):
    model = tmp_path / "tiny.bin"
    model.write_bytes(b"weights")
    for inputs in ([model], [str(model)], [None, "", model]):
        with pytest.raises(OutputPathError, match="is also an input of this run"):
            check_output_path(model, inputs, force=True)
    link = tmp_path / "link.bin"  # another name of the same file
    link.symlink_to(model)
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_path(link, [model], force=True)
    relative = os.path.relpath(model)
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_path(relative, [model], force=True)


def test_a_file_inside_an_input_directory_is_refused(tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="is inside"):
        check_output_path(model / "model.safetensors", [model], force=True)
    assert check_output_path(model / "new.txt", [model]) == model / "new.txt"  # a new file there is fine


def test_missing_folder_directory_and_unwritable_folder(tmp_path):
    with pytest.raises(OutputPathError, match=r"nope: no such directory \(create it first\)"):
        check_output_path(tmp_path / "nope" / "out.txt")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(OutputPathError, match="is a directory; give a file name"):
        check_output_path(tmp_path, force=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputPathError, match="is not a directory"):
        check_output_path(tmp_path / "file" / "out.txt")
    with pytest.raises(OutputPathError, match="empty"):
        check_output_path("")


def test_a_folder_that_refuses_writes(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere: only the next case applies
            with pytest.raises(OutputPathError, match="locked: cannot write there"):
                check_output_path(locked / "out.txt")
    finally:
        locked.chmod(0o700)

    def read_only(*args, **kwargs):  # what a read-only file system answers, root or not
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputPathError, match=r"locked: cannot write there \(Read-only file system\)"):
        check_output_path(locked / "out.txt")


def test_dev_null_is_written_into_not_replaced(tmp_path):
    assert str(check_output_path("/dev/null")) == "/dev/null"
    write_atomically("/dev/null", "nothing\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_write_atomically_replaces_keeps_mode_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out.txt"
    write_lines(out, ["a", "b"])
    assert out.read_text() == "a\nb\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    out.chmod(0o640)
    write_atomically(out, b"new")
    assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    out.write_text("old\n")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(out, "new\n")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
