"""Atomic file and folder writes: a reader sees the old version or the new one, never half."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success fsync and rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; the result is an ordinary file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_output_file(target: str | os.PathLike, flag: str) -> Path:
    """Refuse (one-line UserError naming ``flag``) an output path that cannot be written as a file, before
    any work: an existing folder, a parent that is a file, or a folder this process cannot create files in
    (probed with a temp file, removed at once: permission bits, read-only mounts, root alike). Creates no folder.
    """
    from abcd_edge.errors import UserError

    target = Path(target)
    if target.is_dir():
        raise UserError(f"{flag} {str(target)!r} is a folder; give a file path (e.g. {str(target / 'name')!r})")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent          # the folders below it are created when written, like mkdir -p
    if not ancestor.is_dir():
        raise UserError(f"{flag} {str(target)!r} cannot be written: {str(ancestor)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=ancestor)
    except OSError as exc:
        raise UserError(f"{flag} {str(target)!r} cannot be written: no permission to create files in "
                        f"{str(ancestor)!r} ({exc.strerror}); give a writable path") from None
    os.close(fd)
    os.unlink(probe)
    return target


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | os.PathLike, obj) -> None:
    write_bytes_atomic(target, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success swap it in for ``target``.

    The old folder is moved aside first and removed only after the new one is
    in place, so a crash leaves either the old or the new folder at ``target``
    (or, in the instant between the two renames, the old one under ``.old``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)      # mkdtemp makes 0700; the result is an ordinary folder
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_utf8_text(path: str | Path, flag: str) -> str:
    """A user's text file (a prompt, a prompt list), or a one-line error naming ``flag``: missing, unreadable
    or not UTF-8 (with the first bad byte)."""
    from abcd_edge.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {str(path)!r} does not exist")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{flag} {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                        f"{exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{flag} {str(path)!r} cannot be read ({exc.strerror})") from None


def read_prompt_lines(path: str | Path, flag: str) -> list[str]:
    """One prompt per non-empty line (surrounding spaces stripped) of a UTF-8 file."""
    return [line.strip() for line in read_utf8_text(path, flag).splitlines() if line.strip()]
