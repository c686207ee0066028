"""All-or-nothing directory writes (checkpoints, joint snapshots, bundles, Triton repositories): which existing
directory `--out` may replace, the staging directory beside it, the swap, and the leftovers of a killed run.

Rules: an existing directory is replaced only when it is empty or already the kind the command writes; a staging
directory is `.<name>.tmp-XXXX` with a marker file inside that its run holds locked (flock) until it is done, so the
next run of the same target removes the ones whose run died (kill -9 included) and never a live run's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import MixpertError

MARKER = ".mixpert-staging"  # inside every staging directory; locked by the run that owns it


@dataclass(frozen=True)
class Output:
    """A kind of directory this package writes, known by one file in it (a relative path) and, for JSON files,
    the "format" it must carry."""

    what: str  # for messages: "bundle", "Mixpert checkpoint", ...
    signature: str
    fmt: str | None = None

    def holds(self, path: Path) -> bool:
        f = path / self.signature
        if not f.is_file():
            return False
        if self.fmt is None:
            return True
        try:
            return json.loads(f.read_text()).get("format") == self.fmt
        except (OSError, ValueError, AttributeError):
            return False


def member(directory: Path, name, listed_in: Path) -> Path:
    """`directory / name` for a file name read from `listed_in` (a manifest): refused unless it is a plain name,
    so a crafted entry (`../x`, `/etc/hostname`) cannot make a loader hash or open a file outside `directory`."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise MixpertError(f"{listed_in}: entry {name!r} is not a plain file name inside {directory}; the file was "
                           f"edited or forged, rebuild the directory rather than trusting it")
    return directory / name


def _first_entries(path: Path, n: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_target(final: str | Path, kind: Output, flag: str = "--out", sources: dict | None = None) -> Path:
    """Refuse, in one line and before any work, a target this command must not replace; create missing parents.
    `sources`: {flag: path} this command reads (the directory it replaces must not hold them, and it must not
    write inside them, except replacing a source of its own kind in place). Returns the resolved target."""
    given = str(final)
    final = Path(final).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        raise MixpertError(f"{flag} {given}: is {'the current directory' if final == cwd else 'a parent of the current directory'}"
                           f", which this command would replace; name a new directory below it, e.g. {flag} {given.rstrip('/')}/{kind.what.split()[-1]}")
    if final.exists() and not final.is_dir():
        raise MixpertError(f"{flag} {given}: is a file, not a directory; choose another {flag}")
    if final.is_dir() and any(final.iterdir()) and not kind.holds(final):
        raise MixpertError(f"{flag} {given}: exists and is not a {kind.what} (it holds {_first_entries(final)}); nothing "
                           f"was written or deleted: choose another {flag}, or empty or remove that directory yourself")
    for src_flag, src in (sources or {}).items():
        src_given, src = str(src), Path(src).expanduser().resolve()
        if src != final and final in src.parents:
            raise MixpertError(f"{flag} {given}: holds {src_flag} {src_given}, which replacing it would delete; "
                               f"choose {flag} outside it")
        if src == final and not kind.holds(src):
            raise MixpertError(f"{flag} {given}: is {src_flag} itself, which this command reads; choose another {flag}")
        if src in final.parents:
            raise MixpertError(f"{flag} {given}: is inside {src_flag} {src_given}, which this command reads (and a "
                               f"rebuild of it would delete); choose {flag} outside it")
    blocker = next((p for p in final.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise MixpertError(f"{flag} {given}: {blocker} is a file, so no directory can be made below it; choose another {flag}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkstemp(prefix=f".{final.name}.probe-", dir=final.parent)[1])
        probe.unlink()
    except OSError as e:
        raise MixpertError(f"{flag} {given}: cannot write in {final.parent} ({e.strerror or e}); choose a writable "
                           f"directory") from None
    return final


def _lock(directory: Path, info: dict):
    """Put a locked MARKER into `directory`; returns the open file that holds the lock (closing it releases).
    The marker is written and locked under another name, then renamed, so a cleaner never sees it unlocked."""
    part = directory / f"{MARKER}.part"
    f = open(part, "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(json.dumps(info) + "\n")
    f.flush()
    os.replace(part, directory / MARKER)
    return f


def _remove(directory: Path) -> None:
    """Delete a staging directory, its marker last, so a kill part-way leaves it recognisable for the next run."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name == MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    (directory / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


def staging_dirs(final: Path) -> list[Path]:
    """Staging directories of `final` that this package made (by name and marker), live or not."""
    return [d for d in final.parent.glob(f".{final.name}.tmp-*") if d.is_dir() and (d / MARKER).is_file()]


def remove_stale(final: Path) -> list[Path]:
    """Remove the staging directories of `final` whose run is gone (their marker is not locked). Returns them."""
    removed = []
    for d in staging_dirs(final):
        try:
            f = open(d / MARKER, "r+")
        except OSError:
            continue  # removed by its owner meanwhile
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's
            _remove(d)
            removed.append(d)
    return removed


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit(tmp: Path, final: Path, info: dict) -> None:
    """`tmp` becomes `final`; an old `final` is swapped out in one step where the system allows (so `final` always
    holds a complete old or new directory), then removed as a staging directory of its own."""
    if not final.is_dir():
        os.replace(tmp, final)
        return
    if not _exchange(tmp, final):  # two renames: `final` is missing for an instant
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.replace(final, old / "old")
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old / "old", final)  # put the old one back
            old.rmdir()
            raise
        tmp = old
    with _lock(tmp, {**info, "state": "old, being removed"}):
        _remove(tmp)


@contextlib.contextmanager
def staged_dir(final: str | Path, kind: Output, flag: str = "--out", sources: dict | None = None):
    """Write a directory all or nothing: checks the target (`check_target`), removes the leftovers of killed runs
    of the same target, yields a fresh staging directory beside it that replaces it when the block succeeds and is
    removed when it raises (Ctrl-C included)."""
    final = check_target(final, kind, flag, sources)
    remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    info = {"target": final.name, "kind": kind.what, "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    lock = _lock(tmp, info)
    try:
        yield tmp
        (tmp / MARKER).unlink()  # still locked through `lock` until the swap is done
        _commit(tmp, final, info)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        lock.close()
