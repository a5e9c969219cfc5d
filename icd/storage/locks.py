"""Things several runs share on one storage root: locks, atomic files, folders built once.

Runs started at the same instant on a fresh root (several streams of a nightly suite, a
team's ``icd run``s) create the same things at once: the fixture dataset, the MLflow SQLite
store, the LanceDB pool, Prefect's database, result files. Everything that creates or
replaces a shared thing goes through this module:

- :func:`file_lock`: an exclusive ``flock`` on a lock file next to the thing, across
  processes and threads. The kernel releases it when its holder dies, so a killed run
  never leaves a stale lock behind.
- :func:`atomic_file` / :func:`atomic_write_text`: a file is written under a temporary
  name beside it and renamed over it (``os.replace``), so a reader sees the old file or
  the new one, never half of one, and a kill leaves at most a ``.NAME.*.tmp`` file.
- :func:`merge_json`: a read-merge-write of a JSON object under its lock, so two writers
  never lose each other's entries.
- :func:`build_dir_once`: a folder built by one process while the others wait, into a
  temporary folder, then renamed into place; a complete folder is never deleted (a reader
  may be inside it). A build killed half-way leaves a temporary folder, removed by the
  next build.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from icd.jsontypes import JSONObject, JSONValue

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it)
os.umask(_UMASK)
_GUARD = threading.Lock()


def _thread_lock(path: str) -> threading.Lock:
    with _GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.Lock())


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder if missing) across
    threads of this process and across processes."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(str(path)):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def lock_path(target: str | Path) -> Path:
    """The lock file that guards ``target``'s creation and replacement: ``.NAME.lock``
    beside it."""
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.lock")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new file to; on a clean exit it is
    flushed to disk and renamed over ``path`` (readers see the old file or the new one),
    on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # as an open() would create it, not mkstemp's 0600
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_leftovers(path: str | Path) -> None:
    """Remove the temporary files :func:`atomic_file` calls for ``path`` left behind when
    killed. Only for a caller holding ``path``'s lock, where no live writer can own one."""
    path = Path(path)
    for old in path.parent.glob(f".{path.name}.*.tmp*"):
        with contextlib.suppress(OSError):
            old.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def merge_json(path: str | Path, entries: Mapping[str, JSONValue]) -> JSONObject:
    """Merge ``entries`` into the JSON object in ``path`` ({} when missing or unreadable)
    and write it back atomically, all under ``path``'s lock, so concurrent writers never
    drop each other's entries. Returns the new object."""
    path = Path(path)
    with file_lock(lock_path(path)):
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            value = {}
        if not isinstance(value, dict):
            value = {}
        value.update(entries)
        atomic_write_text(path, json.dumps(value, indent=2))
    return value


def _leftovers(target: Path) -> list[Path]:
    return [
        *target.parent.glob(f".{target.name}.tmp-*"),
        *target.parent.glob(f".{target.name}.old-*"),
    ]


@contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """An empty folder beside ``target`` (same file system) to build it in; removed on
    exit unless :func:`publish_dir` moved it into place. Call it holding ``target``'s lock:
    leftovers of earlier builds of ``target`` killed half-way are removed first."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in _leftovers(target):
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: str | Path, target: str | Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``. A ``target`` already there (an
    incomplete or outdated build: the caller decides, holding the lock) is first renamed
    aside and removed after, so ``target`` is never a half-deleted folder."""
    tmp, target = Path(tmp), Path(target).absolute()
    aside = None
    if target.exists() or target.is_symlink():
        aside = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(target, aside)
    os.rename(tmp, target)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                aside.unlink()


def build_dir_once(
    target: str | Path, is_built: Callable[[Path], bool], build: Callable[[Path], None]
) -> Path:
    """Return folder ``target``, built by ``build(tmp)`` unless ``is_built(target)``.

    Of several processes (or threads) that find it missing at once, one builds it under
    ``target``'s lock while the others wait, then find it built. The build goes into a
    temporary folder renamed into place (:func:`publish_dir`); a complete ``target`` is
    never removed. A build killed half-way leaves its temporary folder and the lock free:
    the next call removes the one and takes the other.
    """
    target = Path(target).absolute()
    if is_built(target):
        return target
    with file_lock(lock_path(target)):
        if is_built(target):  # another process built it while this one waited
            return target
        with staging_dir(target) as tmp:
            build(tmp)
            publish_dir(tmp, target)
    return target
