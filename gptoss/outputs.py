"""Output files: checked before any work starts, written atomically, never over what the run reads.

Every command that writes a file (run.py getp -o/--json, decode.py -o, evaluation/eval.py --json,
export/*.py) checks each output path with check_output_path first, so that a bad path is a one-line
error before a model loads, and writes it with write_atomically, so that a reader never sees half a file.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import GptossError


class OutputPathError(GptossError, ValueError):
    """An output path that cannot or may not be written; the message is one line."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def _is_special(path: Path) -> bool:
    """A character device or a pipe (/dev/null, a FIFO): written into, never replaced."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def check_output_path(path, inputs=(), force: bool = False) -> Path:
    """Raise OutputPathError unless `path` can be written now: its folder exists and is writable, it is
    not a directory, it is none of the `inputs` (files or directories the run reads; a file inside an
    input directory counts as that input), and it does not exist unless `force`. A character device or
    pipe (/dev/null) is always accepted. Returns the path."""
    out = Path(path).expanduser()
    if str(path) == "":
        raise OutputPathError("the output path is empty")
    if out.is_dir():
        raise OutputPathError(f"{out} is a directory; give a file name, e.g. {out / 'out.txt'}")
    if _is_special(out):
        return out
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = Path(given).expanduser()
        if _same_file(out, source):
            raise OutputPathError(f"{out} is also an input of this run; write to another file")
        if source.is_dir() and out.exists() and out.resolve().is_relative_to(source.resolve()):
            raise OutputPathError(f"{out} is inside {source}, which this run reads; write to another file")
    folder = out.parent
    if not folder.exists():
        raise OutputPathError(f"{folder}: no such directory (create it first)")
    if not folder.is_dir():
        raise OutputPathError(f"{folder} is not a directory")
    if out.exists() and not force:
        raise OutputPathError(f"{out} exists; pass --force to overwrite it")
    try:  # a real write: permissions, a read-only file system, ACLs
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputPathError(f"{folder}: cannot write there ({e.strerror or e})") from None
    return out


def _file_mode(path: Path) -> int:
    """The mode the written file gets: the old file's, else what open() would give under the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: `path` holds the old
    content or the new, never a mix, and no temporary file is left behind. A character device or pipe
    is written into directly."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if _is_special(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_lines(path, lines) -> None:
    """write_atomically of one line per item."""
    write_atomically(path, "".join(line + "\n" for line in lines))
