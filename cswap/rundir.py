"""The life of a run directory: checked, locked, assembled as `<run>.partial`, renamed.

Why a module of its own: a run directory is the only thing `cswap prune` leaves behind, and
four rules keep it trustworthy. (1) Nothing is created before the input is validated, so a
bad input leaves nothing (`check_target` only reads, and checks everything the final rename
needs: a plain folder name, no symbolic link, an empty or absent target). (2) One process at
a time: an exclusive, non-blocking `flock` on `<run>.lock` beside it, holding the owner's PID,
so a second run on the same directory fails at once naming the first; the lock file is never
followed through a symbolic link, and a file of that name that is not one of our locks is
left alone. (3) Recorded work is never thrown away silently: a `.partial` holding decisions
is refused unless `--resume` or `--force`, and a complete `.partial` (killed just before its
rename) is only renamed. (4) Nothing that is not provably ours is ever deleted: we write a
marker file (`MARKER`, holding `MARKER_FORMAT`) into every `.partial` we create, and remove a
`.partial` only when it holds that marker; any other folder of that name is an error naming
it. Every OS error is an `OutputError` naming the path.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from .errors import OutputError
from .files import describe_os_error, remove_leftover_temporaries

log = logging.getLogger("cswap")

STATE_FILE = "analysis_state.json"
COMPLETE = ("plan.json", "pruned_model.pt", "report.json")  # written in this order; report.json last
MARKER, MARKER_FORMAT = ".cswap-partial", "cswap run directory in progress, format 1"
_LOCK_LINE = re.compile(r"process \d+ on \S+\n?")


def named(final: Path) -> Path:
    """`final` if it names a folder C-SWAP can create beside others (`--out .`, `/` or `..`
    name none: the run, its `.partial` and its `.lock` are siblings)."""
    final = Path(final)
    if final.name in ("", ".", ".."):
        raise OutputError(f"--out {str(final)!r} does not name a new folder: give a path such as runs/my-run "
                          "(the run is assembled beside it as <name>.partial)")
    return final


def partial_of(final: Path) -> Path:
    final = named(final)
    return final.with_name(final.name + ".partial")


def check_target(final: Path) -> None:
    """Refuse, without creating anything, a run directory that cannot be one: no folder name,
    a symbolic link (for the run, its `.partial` or its `.lock`: the final rename and the
    lock must not act elsewhere), a file, a path under a file, a non-empty directory, a
    `.partial` that is not ours, or a nearest existing folder we cannot write."""
    final = named(final)
    lock = final.with_name(final.name + ".lock")
    for path in (final, partial_of(final), lock):
        if path.is_symlink():
            raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); C-SWAP writes a run only to a "
                              "real folder: give the path it points to, or another --out")
    for path in (final, partial_of(final)):
        if path.exists() and not path.is_dir():
            raise OutputError(f"run directory {path} exists and is a file")
    check_ours(partial_of(final))
    if lock.exists() and not _is_a_lock_file(lock):
        raise OutputError(f"{lock} exists and is not a C-SWAP lock file; it is left as it is: move it away or give "
                          "another --out")
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create run directory {final}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create run directory {final}: {ancestor} is not writable")
    if final.is_dir() and any(final.iterdir()):
        raise OutputError(f"run directory {final} already exists and is not empty")


def is_ours(partial: Path) -> bool:
    """Whether `partial` is a real folder holding our marker with the format we write."""
    marker = partial / MARKER
    if partial.is_symlink() or not partial.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return marker.read_text().strip() == MARKER_FORMAT
    except (OSError, UnicodeDecodeError):
        return False


def check_ours(partial: Path) -> None:
    """Refuse a `partial` that exists and that we did not create: it is the user's."""
    if (partial.exists() or partial.is_symlink()) and not is_ours(partial):
        older = (f" (if it is an interrupted run of an older C-SWAP, continue it with --resume {partial} or remove it "
                 "yourself)" if (partial / "config.yaml").is_file() else "")
        raise OutputError(f"{partial} exists and is not a run directory C-SWAP created (no {MARKER} marker): it is "
                          f"left as it is; move it away or give another --out{older}")


def recorded_work(partial: Path) -> str | None:
    """What an interrupted run left in `partial` that a new run would destroy, or None."""
    if all((partial / name).is_file() for name in COMPLETE):
        return "a complete run that was not yet renamed"
    state = partial / STATE_FILE
    if state.is_file():
        try:
            decisions = json.loads(state.read_text()).get("decisions", [])
        except (ValueError, AttributeError, OSError, UnicodeDecodeError):
            return f"an unreadable {STATE_FILE}"
        if not isinstance(decisions, list):
            return f"an unreadable {STATE_FILE}"
        if decisions:
            return f"{len(decisions)} recorded decisions"
    return None


def read_state(partial: Path) -> dict:
    """The analysis state of an interrupted run, checked: every decision names a unit and a
    category (a truncated or hand-edited file is refused here, not halfway through)."""
    path = partial / STATE_FILE
    if not path.exists():
        return {"decisions": []}
    try:
        state = json.loads(path.read_text())
    except OSError as exc:
        raise OutputError(f"cannot resume: cannot read {path}: {describe_os_error(exc)}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutputError(f"cannot resume: {path} is not valid JSON ({exc}); it was truncated or edited. "
                          "Start the run again with --force to discard it") from exc
    decisions = state.get("decisions") if isinstance(state, dict) else None
    if not (isinstance(decisions, list) and all(_decision_ok(d) for d in decisions)):
        raise OutputError(f"cannot resume: {path} does not hold a list of decisions (unit, category, xi, p_values); "
                          "start the run again with --force to discard it")
    return state


def _decision_ok(d) -> bool:
    """One recorded decision as the pruner writes it: a unit `layer:channel`, a category, and
    for a tested unit xi and the p-values by group (numbers)."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not (isinstance(d, dict) and isinstance(d.get("unit"), str) and isinstance(d.get("category"), str)):
        return False
    layer, colon, channel = d["unit"].rpartition(":")
    if not (layer and colon and channel.isdigit()):
        return False
    if d["category"] == "untested":
        return True
    p_values = d.get("p_values")
    return (number(d.get("xi")) and isinstance(p_values, dict)
            and all(k.lstrip("-").isdigit() and number(v) for k, v in p_values.items()))


class RunLock:
    """An exclusive `flock` on `<run>.lock`, with the holder's PID and host written in it.

    The lock file is removed on release; a process that opened the old file before that
    notices (the path no longer names the file it locked) and tries again. It is never
    opened through a symbolic link, and an existing file that holds anything but one of our
    lock lines is the user's: refused, never truncated or removed."""

    def __init__(self, final: Path):
        self.final = named(final)
        self.path = self.final.with_name(self.final.name + ".lock")
        self.fd: int | None = None

    @staticmethod
    def holder(path: Path) -> str:
        try:
            return path.read_text().strip() or "another process"
        except (OSError, UnicodeDecodeError):
            return "another process"

    def probe(self) -> None:
        """Fail now if another process holds the lock; creates nothing (used before the
        slow validation, so a second run fails fast)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"run directory {self.final} is in use by {self.holder(self.path)} "
                              f"(lock {self.path})") from None
        finally:
            os.close(fd)

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create run directory {self.final}: {describe_os_error(exc)}") from exc
        try:
            fd = self._locked()
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as exc:
            raise OutputError(f"cannot lock run directory {self.final}: {describe_os_error(exc)}") from exc
        self.fd = fd
        return self

    def _locked(self) -> int:
        """A descriptor of the lock file, flocked, that the path still names and that is ours."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
                created = True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW), False
                except FileNotFoundError:  # its holder removed it in between: try again
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"run directory {self.final} is in use by {self.holder(self.path)} "
                                  f"(lock {self.path})") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)  # the holder removed the file between our open and our flock
                continue
            if not created and not _holds_a_lock_line(fd):
                os.close(fd)
                raise OutputError(f"{self.path} exists and is not a C-SWAP lock file; it is left as it is: move it "
                                  "away or give another --out")
            return fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _is_a_lock_file(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return _holds_a_lock_line(fd)
    finally:
        os.close(fd)


def _holds_a_lock_line(fd: int) -> bool:
    """A regular file, empty (a run killed between creating and writing it) or holding the
    one line a RunLock writes."""
    import stat

    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > 1024:
        return False
    try:
        text = os.pread(fd, 1024, 0).decode()
    except UnicodeDecodeError:
        return False
    return text == "" or _LOCK_LINE.fullmatch(text) is not None


def open_partial(final: Path, config_text: str, force: bool) -> Path:
    """Create `<run>.partial` with our marker and its config (call under the lock): a
    leftover of ours without recorded work is removed with a warning, one with recorded work
    needs `force`; a folder of that name that is not ours is refused (`check_target`)."""
    check_target(final)
    partial = partial_of(final)
    if partial.exists():
        work = recorded_work(partial)
        if work and not force:
            raise OutputError(f"{partial} holds {work} of an interrupted run; continue it with --resume {partial}, "
                              "or pass --force to discard it")
        log.warning("removing %s left by an earlier run%s", partial, f" ({work}, --force)" if work else "")
        _remove_ours(partial)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create run directory {partial}: {describe_os_error(exc)}") from exc
    from .files import write_text_atomic

    write_text_atomic(partial / MARKER, MARKER_FORMAT + "\n")
    write_text_atomic(partial / "config.yaml", config_text)
    return partial


def _remove_ours(partial: Path) -> None:
    """Delete a `.partial` we created (checked again right here, the last moment)."""
    if not is_ours(partial):
        check_ours(partial)
    try:
        shutil.rmtree(partial)
    except OSError as exc:
        raise OutputError(f"cannot remove {partial}: {describe_os_error(exc)}") from exc


def discard_unfinished(partial: Path) -> bool:
    """After a run failed: remove its `.partial` when it is ours and holds nothing a resume
    could use (no recorded decision, not complete), so a bad input found mid-analysis leaves
    nothing behind. Returns whether it was removed. Call it only for a `.partial` this run
    created (not for a resumed one)."""
    if not is_ours(partial) or recorded_work(partial) is not None:
        return False
    _remove_ours(partial)
    return True


def finish(partial: Path, final: Path) -> Path:
    """Rename a complete `.partial` into place (call under the lock). The analysis state is
    kept to the last moment: a run killed before the rename is renamed on resume, not redone.
    Our marker leaves with the rename (a finished run directory is not a `.partial`)."""
    missing = [name for name in COMPLETE if not (partial / name).is_file()]
    if missing:
        raise OutputError(f"{partial} is not complete (missing {', '.join(missing)}); nothing was renamed")
    remove_leftover_temporaries(partial)
    try:
        (partial / STATE_FILE).unlink(missing_ok=True)
        if final.is_symlink():
            raise OSError(errno.EEXIST, f"{final} is a symbolic link")
        if final.exists():
            final.rmdir()
        os.replace(partial, final)
    except OSError as exc:
        reason = "it is not empty" if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) else describe_os_error(exc)
        raise OutputError(f"cannot rename {partial} to {final}: {reason}; the run is complete in {partial}") from exc
    try:
        (final / MARKER).unlink(missing_ok=True)
    except OSError as exc:  # the run is complete and in place; the marker is only a leftover
        log.warning("could not remove %s: %s", final / MARKER, describe_os_error(exc))
    return final
