"""The life of a run directory: checked, locked, assembled as `<run>.partial`, renamed.

Why a module of its own: a run directory is the only thing `cswap prune` leaves behind, and
three rules keep it trustworthy. (1) Nothing is created before the input is validated, so a
bad input leaves nothing (`check_target` only reads). (2) One process at a time: an
exclusive, non-blocking `flock` on `<run>.lock` beside it, holding the owner's PID, so a
second run on the same directory fails at once naming the first. (3) Recorded work is never
thrown away silently: a `.partial` holding decisions is refused unless `--resume` or
`--force`, and a complete `.partial` (killed just before its rename) is only renamed.
Every OS error is an `OutputError` naming the path.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from .errors import OutputError
from .files import describe_os_error, remove_leftover_temporaries

log = logging.getLogger("cswap")

STATE_FILE = "analysis_state.json"
COMPLETE = ("plan.json", "pruned_model.pt", "report.json")  # written in this order; report.json last


def partial_of(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def check_target(final: Path) -> None:
    """Refuse, without creating anything, a run directory that cannot be one: a file, a
    path under a file, a non-empty directory, or a nearest existing folder we cannot write."""
    for path in (final, partial_of(final)):
        if path.exists() and not path.is_dir():
            raise OutputError(f"run directory {path} exists and is a file")
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create run directory {final}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create run directory {final}: {ancestor} is not writable")
    if final.is_dir() and any(final.iterdir()):
        raise OutputError(f"run directory {final} already exists and is not empty")


def recorded_work(partial: Path) -> str | None:
    """What an interrupted run left in `partial` that a new run would destroy, or None."""
    if all((partial / name).is_file() for name in COMPLETE):
        return "a complete run that was not yet renamed"
    state = partial / STATE_FILE
    if state.is_file():
        try:
            decisions = len(json.loads(state.read_text()).get("decisions", []))
        except (ValueError, AttributeError, OSError):
            return f"an unreadable {STATE_FILE}"
        if decisions:
            return f"{decisions} recorded decisions"
    return None


def read_state(partial: Path) -> dict:
    """The analysis state of an interrupted run, checked: every decision names a unit and a
    category (a truncated or hand-edited file is refused here, not halfway through)."""
    path = partial / STATE_FILE
    if not path.exists():
        return {"decisions": []}
    try:
        state = json.loads(path.read_text())
    except ValueError as exc:
        raise OutputError(f"cannot resume: {path} is not valid JSON ({exc}); it was truncated or edited. "
                          "Start the run again with --force to discard it") from exc
    decisions = state.get("decisions") if isinstance(state, dict) else None
    ok = isinstance(decisions, list) and all(
        isinstance(d, dict) and isinstance(d.get("unit"), str) and isinstance(d.get("category"), str)
        and (d["category"] == "untested" or (isinstance(d.get("xi"), (int, float)) and isinstance(d.get("p_values"), dict)))
        for d in decisions)
    if not ok:
        raise OutputError(f"cannot resume: {path} does not hold a list of decisions (unit, category, xi, p_values); "
                          "start the run again with --force to discard it")
    return state


class RunLock:
    """An exclusive `flock` on `<run>.lock`, with the holder's PID and host written in it.

    The lock file is removed on release; a process that opened the old file before that
    notices (the path no longer names the file it locked) and tries again."""

    def __init__(self, final: Path):
        self.path = final.with_name(final.name + ".lock")
        self.fd: int | None = None

    @staticmethod
    def holder(path: Path) -> str:
        try:
            return path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def probe(self) -> None:
        """Fail now if another process holds the lock; creates nothing (used before the
        slow validation, so a second run fails fast)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"run directory {self.path.with_suffix('')} is in use by {self.holder(self.path)} "
                              f"(lock {self.path})") from None
        finally:
            os.close(fd)

    def acquire(self) -> "RunLock":
        final = self.path.with_suffix("")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create run directory {final}: {describe_os_error(exc)}") from exc
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise OutputError(f"run directory {final} is in use by {self.holder(self.path)} "
                                      f"(lock {self.path})") from None
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # the holder removed the file between our open and our flock
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as exc:
            raise OutputError(f"cannot lock run directory {final}: {describe_os_error(exc)}") from exc
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def open_partial(final: Path, config_text: str, force: bool) -> Path:
    """Create `<run>.partial` with its config (call under the lock): a leftover without
    recorded work is removed with a warning, one with recorded work needs `force`."""
    check_target(final)
    partial = partial_of(final)
    if partial.exists():
        work = recorded_work(partial)
        if work and not force:
            raise OutputError(f"{partial} holds {work} of an interrupted run; continue it with --resume {partial}, "
                              "or pass --force to discard it")
        log.warning("removing %s left by an earlier run%s", partial, f" ({work}, --force)" if work else "")
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create run directory {partial}: {describe_os_error(exc)}") from exc
    from .files import write_text_atomic

    write_text_atomic(partial / "config.yaml", config_text)
    return partial


def finish(partial: Path, final: Path) -> Path:
    """Rename a complete `.partial` into place (call under the lock). The analysis state is
    kept to the last moment: a run killed before the rename is renamed on resume, not redone."""
    missing = [name for name in COMPLETE if not (partial / name).is_file()]
    if missing:
        raise OutputError(f"{partial} is not complete (missing {', '.join(missing)}); nothing was renamed")
    remove_leftover_temporaries(partial)
    try:
        (partial / STATE_FILE).unlink(missing_ok=True)
        if final.exists():
            final.rmdir()
        os.replace(partial, final)
    except OSError as exc:
        reason = "it is not empty" if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) else describe_os_error(exc)
        raise OutputError(f"cannot rename {partial} to {final}: {reason}; the run is complete in {partial}") from exc
    return final
