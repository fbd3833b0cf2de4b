"""A Ctrl-C while ``python -m softmoe.<command>`` imports torch ends in one line, not Python's traceback.

Python locates the command's module by importing this package first, which imports torch and timm: about 4 s in
which a Ctrl-C (a command started by mistake) printed a 25-line traceback from inside torch's imports. Nothing has
run or been written then, so the process says so and exits as a Ctrl-C does (130). Only while this package is
imported for a ``-m`` command (``sys.argv[0]`` is ``"-m"`` while Python locates the module); the handler it replaced
is back once the imports are done, before any of the command's code runs, so the commands' own Ctrl-C handling
(a run saves its step, a sweep stops its jobs) is unchanged. A command started with SIGINT ignored (a script's
background job) keeps it ignored, as Python does. A library user's ``import softmoe`` is not touched.

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


def _interrupted(signum: int, frame: Any) -> None:
    sys.stderr.write("interrupted while starting (importing torch): nothing was run or written\n")
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


def restore() -> None:
    """Put back the handler this module's import replaced (the package's last act), unless something since has set
    its own; collect what the imports left, freeze the rest, and let the collector run again."""
    if _replaced is not None and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, _replaced)
    if _collection_paused and not gc.isenabled():
        gc.collect()
        gc.freeze()
        gc.enable()
