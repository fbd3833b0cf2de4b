"""Every error the commands report as one line, and the exit status each one gives.

The harness raises these; ``python -m softmoe.train`` / ``.evaluate`` / ``.collect`` print ``error: <message>``
(no traceback) and exit with :func:`exit_code`. Their messages name the key, the file or the process at fault.

| status | meaning |
|---|---|
| 0 | finished |
| 1 | an unexpected error (a traceback is printed) |
| 2 | :data:`USER_ERRORS`: a bad config value, missing or bad data, an unusable checkpoint, a busy run dir, no runs; |
|   | an override Hydra cannot compose (an unknown key or group option, ``overrides.py``) |
| 3 | :class:`NonFiniteError`: stopped on a NaN/inf |
| 128 + signal | stopped by a signal after saving ``last.pt`` (130 SIGINT, 143 SIGTERM, 138 SIGUSR1, 140 SIGUSR2, |
|              | 129 SIGHUP) |
| 141 | its reader closed stdout (``--help | head -3``): it ends quietly (:func:`run_command`), as a shell reports a |
|     | program SIGPIPE ended; a run's log lines (:class:`ConsoleHandler`) stop instead, and the run goes on |
"""

from __future__ import annotations

import atexit
import errno
import gc
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, NoReturn, Sequence

from softmoe import _startup

USER_ERROR_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3  # stopped on a NaN/inf (2 is a bad config, data or checkpoint)


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key, the value and what is allowed."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or saved by a different model."""


class OtherExperimentError(CheckpointError):
    """The run directory's own checkpoint is of another experiment than the config (another model, learning rate,
    run length): a run directory resumes only the experiment it holds, so the run is refused before it writes."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (a full disk, a lost mount); the previous one is untouched."""


class DiskFullError(OSError):
    """A run's file that could not be written mid-run because its disk is full (or its quota spent): ``metrics.jsonl``,
    ``train.log``; the checkpoints written before are kept (a checkpoint's own is :class:`CheckpointWriteError`)."""


def write_failure(error: BaseException) -> "OSError | None":
    """The ``OSError`` behind ``error``: itself, or one in its cause or context (``torch.save`` reports a full disk
    as a RuntimeError, "unexpected pos 12173632 vs 12173524", with the OSError as its context); the first that names
    its file (closing ``metrics.jsonl`` after its write failed fails again, naming none)."""
    failures = []
    while error is not None and len(failures) < 20:
        if isinstance(error, OSError):
            failures.append(error)
        error = error.__cause__ or error.__context__
    return next((failure for failure in failures if failure.filename), failures[0] if failures else None)


def disk_full(error: BaseException) -> "DiskFullError | None":
    """``error`` as a :class:`DiskFullError` where a full disk (or quota) is behind it, else None."""
    cause = write_failure(error)
    if cause is None or cause.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(error, CheckpointWriteError):
        return None
    where = f"{cause.filename}: could not be written" if cause.filename else "a file of the run could not be written"
    return DiskFullError(f"{where} (the disk is full: {cause.strerror}); free some space, then rerun")


class MissingDataError(FileNotFoundError):
    """The dataset is not on disk; the message says where we looked and how to fetch or lay it out."""


class BadDataError(ValueError):
    """A file or example is unusable (unreadable, wrong channel count, label out of range); the message names it."""


class RunDirInUseError(RuntimeError):
    """Another live process trains in this run directory; the message names it."""


class NoRunsError(LookupError):
    """A sweep directory, W&B directory or project holds no run to report (or none logged the metric asked for)."""


class NonFiniteError(RuntimeError):
    """The run stopped on a NaN or inf; the message names the step and the offending parameter."""


# Errors whose message is the whole story: printed as one line, no traceback, exit status 2.
USER_ERRORS = (ConfigError, MissingDataError, BadDataError, CheckpointError, RunDirInUseError, NoRunsError,
               DiskFullError)


def preempted_exit_code(signum: int) -> int:
    """The exit status of a run stopped by ``signum`` after saving: 128 + the signal number, as a shell reports."""
    return 128 + int(signum)


def one_line(error: BaseException) -> str:
    """``error``'s message, as a command prints it after ``error:``. An error raised in a DataLoader worker
    (``trainer.num_workers`` > 0) reaches the training process with the worker's whole traceback as its message
    (PyTorch's ``ExceptionWrapper``: "Caught BadDataError in DataLoader worker process 0.\\nOriginal Traceback ...");
    the original message is its last line, after the error's name."""
    text, kind = str(error), type(error)
    if not (text.startswith(f"Caught {kind.__name__} ") and "\nOriginal Traceback" in text):
        return text
    last, name = text.rstrip("\n").rsplit("\n", 1)[-1], f"{kind.__module__}.{kind.__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


def run_command(command: Callable[[], Any]) -> NoReturn:
    """Run a command's body and exit with the status it returns or exits with (an int or a message; anything else
    is 0). A reader that closed stdout before the end (``| head -3``) ends it quietly, not in a ``BrokenPipeError``
    traceback: Python's recipe (the signal module's "Note on SIGPIPE"), stdout pointed at devnull so that the flush
    at exit cannot fail again, and the status a shell gives a program SIGPIPE ended.

    What is alive when the command ends lives until the exit: frozen then (``gc.freeze``), it is not walked again by
    the interpreter's last garbage collections, which took about a second after torch's imports. Only what nothing
    but a collection would free (reference cycles) is left to the operating system, as Python allows at exit."""
    _startup.command_started()  # the command's Ctrl-C handling from here on; its imports had the one-line exit
    atexit.unregister(gc.freeze)  # once, however often a caller runs a command in its process
    atexit.register(gc.freeze)  # after the handlers registered later (W&B's, joblib's), which run first
    try:
        try:
            status = command()
        except SystemExit as exit:
            status = exit.code
        except KeyboardInterrupt:  # a Ctrl-C no part of the command answers its own way: one line, not a traceback
            print("interrupted", file=sys.stderr)
            status = 128 + int(signal.SIGINT)
        sys.stdout.flush()  # what is still buffered fails here, not at the interpreter's exit
    except BrokenPipeError:
        drop_what_goes_to(sys.stdout)
        status = 128 + int(signal.SIGPIPE)
    sys.exit(status if isinstance(status, (int, str)) else 0)  # 0, not None: a caller reads exit.code


def drop_what_goes_to(stream: Any) -> None:
    """Point ``stream``'s file descriptor at devnull: its reader is gone, and every later write (and the flush at
    the interpreter's exit) would fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class ConsoleHandler(logging.StreamHandler):
    """The console's log handler (``conf/hydra/default.yaml``). A reader that closes the console early
    (``python -m softmoe.train | head -3``) stops its lines, not the run: a run is hours of work, and its
    ``train.log`` keeps every line. Logging's own handler went on, printing a "--- Logging error ---" traceback
    for each line after; the command's exit status is the run's."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            drop_what_goes_to(self.stream)
            return
        super().handleError(record)


def tell_torchrun(lines: Sequence[str]) -> None:
    """Under torchrun, leave the lines this process ends with where torchrun's agent reads a failed worker's error
    (``TORCHELASTIC_ERROR_FILE``, in the format its ``record`` writes): the failure summary it prints after them
    then gives them as each rank's ``traceback`` and the root cause, at the bottom of the screen, instead of "To
    enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = "\n".join(lines)
    try:
        with open(path, "w") as file:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                     "timestamp": str(int(time.time()))}}}, file)
    except OSError:
        pass  # the summary says what it said before; the lines are on the console already


def exit_code(error: BaseException) -> int:
    """The exit status a command gives for ``error`` (1 for anything unexpected: a traceback is printed)."""
    if isinstance(error, USER_ERRORS):
        return USER_ERROR_EXIT_CODE
    if isinstance(error, NonFiniteError):
        return NONFINITE_EXIT_CODE
    return 1
