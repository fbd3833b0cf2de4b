"""Commands the tests run as a user would: in their own process, with this checkout importable."""

import os
import runpy
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from(cwd, command, env=None) -> subprocess.CompletedProcess:
    """``command`` run in ``cwd`` (``env`` added to this process's environment), after it succeeded."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
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
