"""Writing files so that nothing is lost or half-written: the one home of the package's atomic writes.

Every file the package writes goes to a temporary file in the same folder, is flushed and fsynced, and is then
renamed over its destination (``os.replace``, atomic on POSIX), after which the folder is fsynced. A failed write
(a full disk, a read-only folder, a crash) removes its temporary file and leaves the destination as it was. Write
failures are raised as :class:`OutputError`, a one-line message naming the file (and, for a full disk, the space
the write needed and the space left).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "TMP_PREFIX",
    "OutputError",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "FolderBusyError",
    "check_writable",
    "folder_lock",
    "fsync_dir",
    "output_error",
    "public_mode",
]

logger = logging.getLogger(__name__)


#: Temporary files and folders start with this prefix (so a crash's leftovers can be recognised and removed).
TMP_PREFIX = ".tmp-"


class OutputError(OSError):
    """A file or folder could not be written; the message names it and says why, in one line."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix and filename suffix
        return str(self.strerror)


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) that is not a folder, if any."""
    for p in (path, *path.parents):
        try:
            if p.exists():
                return None if p.is_dir() else p
        except OSError:
            return None
    return None


def _describe_os_error(exc: OSError, path: Path | None = None) -> str:
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and path is not None:
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    if exc.errno == errno.EISDIR:
        return "it is a folder"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def output_error(path: str | os.PathLike, exc: OSError, needed: int | None = None) -> OutputError:
    """An :class:`OutputError` for a failed write of ``path``: what failed and, on a full disk, the space needed."""
    path = Path(path)
    message = f"cannot write {path}: {_describe_os_error(exc, path)}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = next((p for p in path.parents if p.exists()), Path("."))
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            need = f"{needed / 2**20:.1f} MiB needed, " if needed else ""
            message += f" ({need}{free / 2**20:.1f} MiB free on {folder})"
    error = OutputError(exc.errno, message)
    error.filename = str(path)
    return error


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a power loss (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)
    return mask


def public_mode(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the mode a plain ``open``/``mkdir`` would have."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; renamed over ``path`` when the block ends without error.

    For writers that take a file name (matplotlib, exporters). On any error the temporary file is removed and
    ``path`` is left untouched; ``OSError`` comes out as :class:`OutputError` naming ``path``.

    Args:
        path: the destination.
        suffix: the temporary file's suffix (default: ``path``'s, which writers choose formats by).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tail = suffix if suffix is not None else path.suffix
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=tail, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(path, exc) from None
    tmp = Path(name)
    public_mode(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(path, exc, tmp.stat().st_size if tmp.exists() else None) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise output_error(path, exc, len(data)) from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Fail early, before any work, if ``path`` cannot be written; creates nothing.

    The folder that will hold the output (or, if it does not exist yet, its nearest existing parent, where it would be
    created) must be a folder in which a file can be made; an existing file must be writable and not a folder.

    Args:
        path: a file to be written, or, with ``folder=True``, a folder to be created or written into.
        folder: ``path`` is a folder.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: it cannot be written (one line naming it and why).
    """
    path = Path(path)
    target = path if folder else path.parent
    target = target if str(target) else Path(".")
    existing = next((p for p in (target, *target.parents) if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        raise output_error(path, NotADirectoryError(errno.ENOTDIR, "not a folder"))
    try:
        fd, probe = tempfile.mkstemp(prefix=".condconv-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise output_error(existing if existing == target else path, exc) from None
    if not folder and path.is_dir():
        raise output_error(path, IsADirectoryError(errno.EISDIR, "is a folder"))
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise output_error(path, PermissionError(errno.EACCES, "permission denied"))
    return path


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock (the message names the holder)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def _describe_holder(fd: int) -> str:
    holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    if not holder.get("pid"):  # it has taken the lock but not written its name yet
        return "another process"
    return f"process {holder['pid']} on {holder.get('host', '?')} (since {holder.get('started', '?')})"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the duration of the block.

    The lock is ``fcntl.flock`` on ``folder/.lock``, which holds the holder's PID, host and start time. The kernel
    releases it when the holder exits, even by SIGKILL; a lock file left by a process that is no longer running is
    taken over with a warning. Where ``fcntl`` does not exist (Windows) no lock is taken.

    Raises:
        FolderBusyError: another running process holds the lock (the message names it).
        OutputError: the folder or its lock file cannot be written.
    """
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        logger.debug("no fcntl: %s %s is not locked", what, folder)
        yield folder
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    path = folder / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as exc:
        raise output_error(path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(f"{what} {folder} is in use by {_describe_holder(fd)}: wait for it to finish, or "
                                  "use another folder") from None
        except OSError as exc:  # a file system without locks (some network and FUSE mounts)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise output_error(path, exc) from None
            logger.warning("%s %s: cannot lock it (%s): make sure no other process uses it", what, folder,
                           exc.strerror)
            yield folder
            return
        previous = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if previous.get("pid"):  # a holder that did not release cleanly (killed), or a reused PID
            pid = previous["pid"]
            alive = previous.get("host") == socket.gethostname() and pid.isdigit() and _pid_alive(int(pid))
            logger.warning("%s %s: taking over the lock of process %s on %s, which %s", what, folder, pid,
                           previous.get("host", "?"), "no longer holds it" if alive else "is no longer running")
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} started={stamp}\n".encode(), 0)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
