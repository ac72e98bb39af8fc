"""Files from folders the package does not control (run folders, data folders), opened
as untrusted input: only regular files are read (a FIFO would block, a device never
ends), reads are bounded, and files written or appended to in place are never followed
through a symbolic link. Each refusal is one line naming the file.

(Whole files are written atomically by ``pyro_vae.checkpoints.atomic_write``: a new file
renamed over the name, which replaces a link rather than following it.)
"""

import errno
import os
import stat
from pathlib import Path

#: The largest JSON file (config.json) read from a run folder.
MAX_JSON_BYTES = 1 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str = "file"):
    """``path`` opened for reading in binary, refused in one line unless it is a regular
    file (checked on the open file, so it cannot be swapped after the check; opening does
    not block on a FIFO). ``FileNotFoundError`` passes through."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise OSError(f"{path}: cannot be read ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"{path}: {_kind(mode)}, not a regular file; a {what} must be a "
                         f"file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bounded(path, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path`` (``open_regular``), refused in one line when
    it holds more than ``limit`` bytes."""
    path = Path(path)
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: more than {limit} bytes; a {what} is not that large "
                         f"(is this the right file?)")
    return data


def append_text(path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing) without following a symbolic link
    there, and only to a regular file with no other name (a hard link would carry the
    write elsewhere); one line naming the file otherwise."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK \
        | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        raise _refused(path, e) from None
    try:
        check_own_file(fd, path)
        os.write(fd, text.encode())
    except OSError as e:
        raise OSError(f"{path}: not written ({e.strerror or e})") from None
    finally:
        os.close(fd)


def check_own_file(fd: int, path) -> None:
    """Refuse (``OSError``, one line) an open ``fd`` that is not a regular file with one
    name: written in place, it would change something outside the folder."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path}: {_kind(st.st_mode)}, not a regular file; not written")
    if st.st_nlink > 1:
        raise OSError(f"{path}: has {st.st_nlink} names (hard links); not written in "
                      f"place, remove it")


def open_nofollow(path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that refuses (one line) to follow a symbolic link at ``path`` and
    does not block on a FIFO; the descriptor is checked by ``check_own_file``."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        raise _refused(path, e) from None
    try:
        check_own_file(fd, path)
    except OSError:
        os.close(fd)
        raise
    return fd


def _refused(path: Path, e: OSError) -> OSError:
    if e.errno == errno.ELOOP:
        return OSError(f"{path}: a symbolic link; files in a run folder are written in "
                       f"place only, remove the link")
    return OSError(f"{path}: cannot be opened ({e.strerror or e})")
