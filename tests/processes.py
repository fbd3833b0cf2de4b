"""Commands the tests run as a user would: in their own process, with this checkout importable."""

import faulthandler
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_env(env=None) -> dict:
    """This process's environment, ``env`` added, with this checkout importable (first on ``PYTHONPATH``)."""
    return {**os.environ, **(env or {}), "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_from(cwd, command, env=None) -> subprocess.CompletedProcess:
    """``command`` run in ``cwd`` (``env`` added to this process's environment), after it succeeded."""
    completed = subprocess.run(command, cwd=cwd, env=checkout_env(env), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def run_here(monkeypatch, script, *arguments) -> int:
    """``python script arguments`` run by this interpreter, as ``__main__`` (runpy): its exit status; what it prints
    is the test's ``capsys``. For scripts that only parse, count or tabulate: a timing script, whose threads and
    allocator settings are process-wide, runs in a process of its own (:func:`run_from`)."""
    monkeypatch.setattr(sys, "argv", [str(script), *arguments])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exited:
        return exited.code if isinstance(exited.code, int) else 1
    return 0


def refused_here(monkeypatch, command, *arguments) -> int:
    """``python -m softmoe.<command> arguments`` (``command`` its module), refused before Hydra starts, run by the
    command's own entry point in this process: its exit status; its line is the test's ``capsys``. A command line
    that reaches Hydra's ``main`` fails the test instead of training here: commands that run, and one refused
    command per path, start processes of their own (:func:`run_from`)."""
    def reached_hydra():
        raise AssertionError(f"python -m {command.__name__} {' '.join(arguments)}: not refused before Hydra")

    monkeypatch.setattr(command, "main", reached_hydra)
    monkeypatch.setattr(sys, "argv", [command.__file__, *arguments])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # which skips the checks, leaving the error to Hydra
    with pytest.raises(SystemExit) as exited:
        command.command_line()
    return exited.value.code


def fork_command(module, arguments, output, errors=None, cwd=None) -> int:
    """Fork a process running ``python -m <module> <arguments>`` as that command's ``__main__`` (runpy), in ``cwd``;
    its stdout goes to the file ``output``, its stderr to ``errors`` (default: the same file). Returns the pid.

    This process has imported torch and timm, so the fork starts in well under a second where a fresh interpreter
    spends some 5 s importing them. The child is a real process of its own (real signals, its own exit status), but
    ends with ``os._exit``: it runs no ``atexit`` hook, so a command whose last line an ``atexit`` hook prints is
    started with :func:`subprocess.Popen` instead. What it prints is what a fresh interpreter prints
    (:func:`as_a_fresh_interpreter`). Where this process has initialised CUDA, which a forked child cannot use, the
    command starts as a fresh interpreter (``python -m``) instead; :func:`exit_status` and :func:`wait` read both."""
    if cuda_initialised():
        return spawn_command(module, arguments, output, errors, cwd)
    with open(output, "ab") as out, open(errors or output, "ab") as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                if cwd is not None:
                    os.chdir(cwd)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # not pytest's capture objects
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                as_a_fresh_interpreter()
                sys.modules.pop(module, None)  # imported by a test: `python -m` runs the module's only copy
                sys.argv = [module, *arguments]
                runpy.run_module(module, run_name="__main__", alter_sys=True)  # as `python -m` runs it
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    return pid


class ForkedCommand:
    """``python -m <module> <arguments>`` started in ``cwd`` by :func:`fork_command`, read like the
    :class:`subprocess.Popen` it stands for (``poll``, ``send_signal``, ``communicate``, ``returncode``, ``pid``):
    its stdout and stderr together in the file ``output``, or stderr apart beside it (``stderr_apart``). Each file
    is emptied first: it holds this command's output only, even where a test before it used the same name (pytest
    deletes a passed test's ``tmp_path`` and gives the next test of the same name prefix that number again)."""

    def __init__(self, module, arguments, cwd, output, stderr_apart=False):
        self._output = Path(output)
        self._errors = self._output.with_suffix(".err") if stderr_apart else self._output
        for file in {self._output, self._errors}:
            file.write_bytes(b"")
        self.pid = fork_command(module, arguments, self._output, self._errors, cwd=cwd)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = exit_status(self.pid, block=False)
        return self.returncode

    def send_signal(self, signum):
        os.kill(self.pid, signum)

    def output_so_far(self) -> str:
        """What the command wrote to its output file until now (stdout, and stderr unless apart)."""
        return self._output.read_text()

    def communicate(self, timeout=300):
        """(stdout, stderr), stderr None unless apart, once the command ended."""
        if self.returncode is None:
            self.returncode = wait(self.pid, timeout)
        return self._output.read_text(), self._errors.read_text() if self._errors != self._output else None


def run_forked(module, arguments, cwd, merged=False, timeout=300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *arguments], cwd=cwd, capture_output=True, text=True)`` by
    :func:`fork_command`: for a command that runs to its end in its own process (no ``atexit`` line, no worker
    processes of its own to inherit this one's state), some 5 s sooner. ``merged``: stderr into stdout, as
    ``stderr=subprocess.STDOUT``."""
    with tempfile.TemporaryDirectory() as folder:
        command = ForkedCommand(module, arguments, cwd, Path(folder) / "output", stderr_apart=not merged)
        stdout, stderr = command.communicate(timeout)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *arguments], command.returncode, stdout,
                                           stderr)


# Commands fork_command started as fresh interpreters, by pid (their Popen objects reap them)
SPAWNED: dict[int, subprocess.Popen] = {}


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def spawn_command(module, arguments, output, errors=None, cwd=None) -> int:
    """:func:`fork_command`'s command as a fresh interpreter, with this checkout importable; its pid."""
    with open(output, "ab") as out, open(errors or output, "ab") as err:
        process = subprocess.Popen([sys.executable, "-m", module, *arguments], cwd=cwd, env=checkout_env(),
                                   stdout=out, stderr=err)
    SPAWNED[process.pid] = process
    return process.pid


def as_a_fresh_interpreter() -> None:
    """What pytest changed in this process, put back as a fresh interpreter has it, so the child prints what a
    command prints: Python's default warning filters, warnings printed to stderr (pytest records them, filtered by
    pyproject.toml); a root logger without pytest's capturing handler (a record reaches stderr as ``logging``'s
    last resort, or the handlers the command installs); exceptions in threads and in ``__del__`` printed (pytest
    collects them); faulthandler off (pytest's writes to its own stderr)."""
    # the signals as a command started at a terminal has them: pytest started as a script's background job, or under
    # nohup, has SIGINT or SIGHUP ignored, which the child would inherit (and a run keeps SIGHUP ignored, by design)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    threading.excepthook = threading.__excepthook__
    sys.unraisablehook = sys.__unraisablehook__
    faulthandler.disable()
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    logging.root.setLevel(logging.WARNING)
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)  # each goes first: the last is tried first
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def exit_status(pid, block=True):
    """The exit status of child ``pid`` (``-signal`` when a signal killed it, as ``subprocess`` says), or None while
    it runs (``block=False``)."""
    if pid in SPAWNED:
        return SPAWNED[pid].wait() if block else SPAWNED[pid].poll()
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def wait(pid, timeout=300):
    """The exit status of child ``pid``; killed, and the test failed, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = exit_status(pid, block=False)
        if status is not None:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    exit_status(pid)
    raise AssertionError(f"process {pid} still running after {timeout} s")
