"""A Ctrl-C while ``python -m softmoe.<command>`` imports torch ends in one line, not Python's traceback.

Python locates the command's module by importing this package first, which imports torch and timm: about 4 s in
which a Ctrl-C (a command started by mistake) printed a 25-line traceback from inside torch's imports. Nothing has
run or been written then, so the process says so and exits as a Ctrl-C does (130). Only while this package is
imported for a ``-m`` command (``sys.argv[0]`` is ``"-m"`` while Python locates the module); the handler it replaced
is back once the imports are done, before any of the command's code runs: for the package's commands
(:data:`COMMANDS`) once the command's own module has imported what it needs too, when its
:func:`~softmoe.harness.errors.run_command` starts (:func:`command_started`), else at the end of the package's
import. So the commands' own Ctrl-C handling (a run saves its step, a sweep stops its jobs) is unchanged. A command
started with SIGINT ignored (a script's background job) keeps it ignored, as Python does. A library user's
``import softmoe`` is not touched.

For the same ``-m`` commands, the garbage collector waits until those imports are done: its automatic passes over
the hundreds of thousands of objects torch and timm create took about a second of a command's start, and found
almost nothing to free (modules, classes and functions live until the exit). One pass then frees what the imports
left, and what remains is frozen (``gc.freeze``): later passes, and the one at the exit, skip it."""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any, Callable, Optional


# The modules whose `python -m` runs a command through softmoe.harness.errors.run_command, which calls
# command_started() first (tests/test_reliability.py checks that each does)
COMMANDS = ("softmoe.train", "softmoe.evaluate", "softmoe.collect", "softmoe.benchmark", "softmoe.plan",
            "softmoe.to_safetensors")


def _interrupted(signum: int, frame: Any) -> None:
    sys.stderr.write("interrupted while starting (importing its modules): nothing was run or written\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # as a process ended by the signal is seen by a shell: 130


def locating_a_command() -> bool:
    """Whether Python imports this package to locate a ``-m`` module (``sys.argv[0]`` is ``"-m"`` only then)."""
    return sys.argv[:1] == ["-m"]


def quiet_while_importing() -> Optional[Callable]:
    """Install the one-line Ctrl-C handler if this import locates a ``-m`` command; the handler it replaced (for
    :func:`restore`), or None when nothing was installed."""
    if not locating_a_command():
        return None
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return None  # started with Ctrl-C ignored (a script's background job): as Python does, it stays ignored
    try:
        return signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread: leave the signal alone
        return None


_replaced = quiet_while_importing()  # at this module's import: the package's first, before torch's


def collect_after_importing() -> bool:
    """Pause automatic garbage collection if this import locates a ``-m`` command (:func:`restore` resumes it)."""
    if not locating_a_command() or not gc.isenabled():
        return False
    gc.disable()
    return True


_collection_paused = collect_after_importing()


def located_module() -> Optional[str]:
    """The module ``python [options] -m <module>`` runs, or None for any other start."""
    argv = list(getattr(sys, "orig_argv", ()))
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None


def restore() -> None:
    """The package's last act: collect what the imports left, freeze the rest, let the collector run again; then put
    back the handler this module's import replaced, unless a command's module is still to import
    (:func:`command_started` puts it back then) or something since has set its own. The handler stays installed
    through the collection (about a second), so a Ctrl-C there is one line too."""
    if _collection_paused and not gc.isenabled():
        gc.collect()
        gc.freeze()
        gc.enable()
    if located_module() not in COMMANDS:
        command_started()


def command_started() -> None:
    """Put back the handler this module's import replaced, unless something since has set its own: the command's
    code, which answers Ctrl-C its own way, starts now (:func:`~softmoe.harness.errors.run_command`)."""
    if _replaced is not None and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, _replaced)
