"""Atomic writes: an artifact is either absent or complete, never half-written, and a published path is
never missing.

A directory output (`atomic_dir`) is written into a version directory beside it and published by
swapping a symlink with one rename: `out -> .out.v-<pid>-<token>`. Readers see the old version or the new
one, and `out` exists throughout; a replaced version is kept for RETIRED_GRACE_S after its swap, so a
reader that resolved the link just before it still finds its files. A reader that opens several files of one
output should resolve the link once (`Path(out).resolve()`) and read them all from that version. Versions, staging leftovers and link temporaries of killed runs
(their process is gone) are removed by the next write of the same output.

An output directory is replaced only when this project wrote it (a `.recsys-pretrain` marker in it, or
a link to one of its versions) or it is empty; never when it contains one of the command's inputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
MARKER = ".recsys-pretrain"  # in every directory `atomic_dir` publishes
# What this project's outputs held before they carried the marker (ingest, prepare, labels, a model, an
# index, a ranker): such a directory is recognised as its own, so an upgrade does not stop the nightly flow.
LEGACY_LAYOUTS = (("report.json", "events.parquet", "vocab.json"), ("meta.json", "loo.parquet"),
                  ("labels.parquet", "labels_report.json"), ("model.json", "weights.pt"), ("index.json",),
                  ("ranker.json", "weights.pt"))
# A version replaced by a newer one is kept this long after it stopped being published, so that a reader who
# resolved the link just before a swap (and was then descheduled) still finds its files.
RETIRED_GRACE_S = 60.0
RETIRED = ".retired"  # in a version directory: when it stopped being the published one
# Staging directories of the older layout (`.<name>.staging-<random>`) name no process: removed once this old.
LEGACY_STAGING_AGE_S = 3600.0


class OutputError(ValueError):
    """An output path that this command must not write: it holds an input, or a directory it did not write."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sha256_file(path: str | Path, into: hashlib._Hash | None = None, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks; with `into`, the bytes are added to that running hash."""
    h = hashlib.sha256() if into is None else into
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---- directory outputs ----------------------------------------------------------------------------------
def _absolute(path: Path) -> Path:
    """`path` made absolute without following its last component (which may be a published link)."""
    return path.parent.resolve() / path.name


def _version_of(path: Path) -> Path | None:
    """The version directory `path` links to, if it is a link this module published."""
    if not path.is_symlink():
        return None
    target = os.readlink(path)
    return path.parent / target if "/" not in target and target.startswith(f".{path.name}.v-") else None


def written_here(path: str | Path) -> bool:
    """True when `path` may be replaced: absent, empty, or written by this project."""
    path = Path(path)
    if _version_of(path) is not None:
        return True
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return False
    if not path.exists():
        return True
    if (path / MARKER).exists() or not any(path.iterdir()):
        return True
    return any(all((path / f).exists() for f in layout) for layout in LEGACY_LAYOUTS)


def check_output(path: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> None:
    """Refuse an output that holds (or is) one of `inputs`, and a directory this project did not write
    (unless `force`). Raises OutputError naming both."""
    out = _absolute(Path(path))
    outs = {out, out.resolve()}
    for given in inputs:
        inp = Path(given).resolve()
        if any(inp == o or o in inp.parents for o in outs):
            raise OutputError(f"{path}: the output would replace the input {given}; choose another output path")
    if not force and not written_here(path):
        what = "a file" if Path(path).exists() and not Path(path).is_dir() else "a directory this project did not write"
        raise OutputError(f"{path}: is {what} (no {MARKER} marker); refusing to replace it. Choose another "
                          "output path, or pass --force to replace it")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover_pid(name: str, stem: str) -> int | None:
    """The pid in `.<stem>.<kind>-<pid>-<token>`, for this module's temporaries; None for anything else."""
    for kind in ("v", "link", "staging", "old"):
        prefix = f".{stem}.{kind}-"
        if name.startswith(prefix):
            pid = name[len(prefix):].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def _legacy_staging(entry: Path, stem: str) -> bool:
    """A staging directory of the older layout (`.<stem>.staging-<mkdtemp suffix>`, no pid) left long ago."""
    if not entry.name.startswith(f".{stem}.staging-") or _leftover_pid(entry.name, stem) is not None:
        return False
    try:
        return time.time() - entry.lstat().st_mtime > LEGACY_STAGING_AGE_S
    except OSError:
        return False


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def clean_stale(path: str | Path) -> list[Path]:
    """Remove what killed writes of `path` left beside it (their process is gone), never the live
    version. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    live = _version_of(path)
    removed = []
    for entry in path.parent.iterdir():
        pid = _leftover_pid(entry.name, path.name)
        if _legacy_staging(entry, path.name) or (pid is not None and entry != live and not pid_alive(pid)):
            _remove(entry)  # (a live pid: a write still in progress)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield a fresh version directory for `path`; on success publish it as `path` (one rename of a
    link), on error remove it. Refuses (OutputError) an output that holds an input or a directory this
    project did not write, unless `force`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_output(path, inputs, force)
    clean_stale(path)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    version = path.parent / f".{path.name}.v-{tag}"
    version.mkdir()
    published = False
    try:
        yield version
        os.chmod(version, 0o777 & ~_UMASK)
        link = path.parent / f".{path.name}.link-{tag}"
        os.symlink(version.name, link)
        with file_lock(path.parent / f".{path.name}.lock"):  # one publish of this output at a time
            (version / MARKER).write_text(json.dumps({"written_by": "recsys-pretrain", "at": time.time()}) + "\n")
            old = _version_of(path)
            if path.is_symlink() or not path.exists():
                os.replace(link, path)  # one rename: `path` is never missing
            else:  # a plain directory (an older layout, or a forced replace): moved aside first, once
                aside = path.parent / f".{path.name}.old-{tag}"
                os.replace(path, aside)
                os.replace(link, path)
                _remove(aside)
            published = True
            if old is not None and old.exists():
                (old / RETIRED).touch()
            # Versions retired more than RETIRED_GRACE_S ago go (a reader who resolved the link to one just
            # before its swap has had time to open its files); versions still being written (no marker yet,
            # it is written only here) are left to their writers.
            now = time.time()
            for entry in path.parent.iterdir():
                if entry.name.startswith(f".{path.name}.v-") and entry != version and (entry / MARKER).exists():
                    retired = entry / RETIRED
                    if not retired.exists() or now - retired.stat().st_mtime > RETIRED_GRACE_S:
                        _remove(entry)
    finally:
        if not published:
            shutil.rmtree(version, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, UnboundLocalError):
                link.unlink()


# ---- locks ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float | None = None) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, held for the block: serialises read-modify-write
    sections across threads and processes on one machine (and on shared file systems that honour flock).
    Released when the holder exits, even by kill -9."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: still locked by another run after {timeout_s:g} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_disk_full(exc: BaseException, where: str | Path | None = None) -> bool:
    """True for 'no space left' (or quota) errors, however the library that hit it reports them: by errno
    or message, or (torch and NumPy report a short write without either) when the file system of `where`
    has under 1 MiB free."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
        return True
    if where is None or not isinstance(exc, (OSError, RuntimeError)):
        return False
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < (1 << 20)
    except OSError:
        return False
