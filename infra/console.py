"""What the person at the terminal sees, apart from what goes to the log file (issue 18).

A pipeline command runs inside `log_to_file(path)`: file descriptors 1 and 2 point at the log, so
everything the process and its children write (Ray's and DeepSpeed's chatter, worker output that
Ray forwards to the driver, tracebacks) lands there in full. The terminal gets only what is written
through `say` and `progress`: a line per event, a bar per running stage, the summary.
Outside `log_to_file` (tests, `--verbose`) both go to the ordinary streams.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import IO, Any

from tqdm import tqdm

_terminal: IO[str] | None = None
_log: str | None = None


def current_log() -> str | None:
    """The log file of the running command, when output is being captured."""
    return _log


def terminal() -> IO[str]:
    """The person's terminal (stdout when output is not being captured)."""
    return _terminal or sys.stdout


def say(message: str) -> None:
    """One line for the person, also kept in the log."""
    if _terminal is not None:
        print(message, file=_terminal, flush=True)
    print(message, flush=True)  # the log (or, uncaptured, the terminal itself)


def error(message: str) -> None:
    """The failure line: on the terminal's stderr side when captured, and in the log."""
    print(message, file=sys.stderr, flush=True)
    if _terminal is not None:
        print(message, file=_terminal, flush=True)


def unwrap(error: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (a task's `cause`, a Train worker's
    `_base_exc`, a failed health check's `health_check_failure`)."""
    for _ in range(8):
        inner = (
            getattr(error, "_base_exc", None)
            or getattr(error, "health_check_failure", None)
            or getattr(error, "cause", None)
        )
        if not isinstance(inner, BaseException) or inner is error:
            return error
        error = inner
    return error


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` of the exception that started it all."""
    exc = unwrap(exc)
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else repr(exc)
    if "Original Traceback" in str(exc) and lines:
        # torch's DataLoader re-raises a worker's error as "Caught X in DataLoader worker process
        # N." + the worker's traceback: its last line is the error itself (e.g. the missing file).
        text = lines[-1].split(": ", 1)[-1] if lines[-1].startswith(f"{type(exc).__name__}:") else text
    # Errors whose message already is the whole line (they say `one_line_message = True`).
    return text if getattr(exc, "one_line_message", False) else f"{type(exc).__name__}: {text}"


def progress(**kwargs: Any) -> tqdm:
    """A progress bar on the terminal (tqdm arguments)."""
    out = terminal()
    # Not a terminal (a pipe, a CI log): redraw rarely, or the \r updates pile up in the file.
    kwargs.setdefault("mininterval", 1.0 if out.isatty() else 60.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=out, **kwargs)


def log_path(work_dir: str, command: str) -> str:
    """<work_dir>/logs/<command>-<time>.log for a local work dir, else under ~/.cache/restok/logs."""
    base = work_dir if "://" not in work_dir else os.path.expanduser("~/.cache/restok")
    return os.path.join(base, "logs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


@contextlib.contextmanager
def log_to_file(path: str) -> Iterator[str]:
    """Send fds 1 and 2 (and so every child process started meanwhile) to `path`; `say` and
    `progress` still reach the terminal. Restores both on exit."""
    global _terminal, _log
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log = open(path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    previous = _terminal, _log
    _terminal, _log = os.fdopen(os.dup(saved_out), "w", buffering=1), path
    try:
        yield path
    except BaseException as exc:
        traceback.print_exc()  # the whole story stays in the log
        with contextlib.suppress(AttributeError):
            exc.restok_log = path  # the CLI names it in its one line
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _terminal.close()
        _terminal, _log = previous
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        log.close()
