"""
Every file the program keeps is written atomically: a checkpoint, sizes.json, eval_matrix.json, a
shard, a picture. write_atomic writes into FILE.tmpPID beside it and renames it over FILE, so a
reader, or a rerun after a kill, sees the old file or the new one, never half of one; the next run
removes what a killed process left (remove_stale_temporaries). A write that fails (no space, too
large, no permission) is one line naming the file (WriteError); append_line adds a whole line to a
log or none of it.
"""
import json
import os
from typing import BinaryIO, Callable


class WriteError(SystemExit):
    """A file that could not be written (no space, too large, no permission): one line naming it
    and the cause."""

    def __init__(self, path: str, cause: OSError):
        super().__init__(f"error: could not write {path}: {cause.strerror or cause}; free some "
                         f"space or fix the folder's permissions, then rerun")


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """write(f) into a temporary file beside path, then rename it over path: a reader (or a rerun
    after a kill) sees the old file or the new one, never half of one. A failure leaves no
    temporary file and is a WriteError; a kill leaves PATH.tmpPID, which remove_stale_temporaries
    clears once that process is gone."""
    tmp = f"{path}.tmp{os.getpid()}"  # one per process: ranks writing one file do not collide
    f = None
    try:
        with open(tmp, "wb") as raw:
            f = KeepsOSError(raw)
            write(f)
        os.replace(tmp, path)
    except Exception as e:
        cause = f.error if f is not None and f.error else e
        if not isinstance(cause, OSError):
            raise
        raise WriteError(path, cause) from cause
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class KeepsOSError:
    """A file that keeps the OS's error of a failed write (no space, too large): torch.save
    reports it only as "unexpected pos", which says nothing of the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def check_writable(path: str) -> None:
    """Refuse in one line, before any compute, a file that cannot be written at path: a folder
    there, no folder to hold it, or one that cannot be written (WriteError)."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path) or not os.path.isdir(folder):
        why = "it is a folder" if os.path.isdir(path) else f"no folder {folder}"
        raise SystemExit(f"error: cannot write {path}: {why}; name a file in a folder that exists")
    probe = f"{path}.tmp{os.getpid()}"  # as write_atomic's: a rerun clears one a kill left
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise WriteError(path, e) from e


def write_json(path: str, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def append_line(path: str, line: str) -> None:
    """Append line and a newline to path (a log such as RUN/log.jsonl): all of it, or, where the
    write fails, none of it and a WriteError naming the file."""
    data = (line + "\n").encode()
    try:
        with open(path, "ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            try:
                while data:  # a write near a size limit may take only part
                    data = data[f.write(data):]
            except OSError:
                f.truncate(end)  # no half line for a reader of the log to trip on
                raise
    except OSError as e:
        raise WriteError(path, e) from e


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the FILE.tmpPID that write_atomic left in folder when a kill stopped process PID,
    unless that process is still alive (another rank, another run writing there). Returns the
    names removed."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if os.path.isfile(os.path.join(folder, name)) and stale_temporary(name):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def stale_temporary(name: str, stem: str | None = None) -> bool:
    """Whether name is STEM.tmpPID (of this stem, if given) and process PID is gone: what a kill
    left half-written."""
    before, _, pid = name.rpartition(".tmp")
    return (bool(before) and (stem is None or before == stem) and pid.isdigit()
            and not _alive(int(pid)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
