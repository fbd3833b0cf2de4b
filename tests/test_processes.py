"""The forked commands of tests/processes.py behave as ``python -m`` would: what they print, their exit status."""

from __future__ import annotations

import importlib
import signal
import sys

import pytest

import processes
from processes import ForkedCommand, fork_command, wait

COMMAND = '''
import gc, logging, sys, threading, warnings

class Unraisable:
    def __del__(self):
        raise RuntimeError("raised in __del__, printed as Python prints it")

if __name__ == "__main__":
    logging.getLogger("some.module").warning("logged, as a fresh interpreter prints it")
    logging.getLogger("some.module").info("not logged, as a fresh interpreter does not print it")
    warnings.warn("shown, as a fresh interpreter shows it")
    warnings.warn("hidden, as a fresh interpreter hides it", PendingDeprecationWarning)
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()
    Unraisable()
    gc.collect()
    print("argv", sys.argv[1:])
    sys.exit(int(sys.argv[1]))
'''


@pytest.fixture
def command(tmp_path, monkeypatch):
    """``python -m commands.prints`` in ``tmp_path``, a module of a package this process has imported too."""
    (tmp_path / "commands").mkdir()
    (tmp_path / "commands" / "__init__.py").write_text("")
    (tmp_path / "commands" / "prints.py").write_text(COMMAND)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # a forked child inherits it
    importlib.import_module("commands.prints")
    yield "commands.prints"
    for name in ("commands.prints", "commands"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("cuda", [False, True], ids=["forked", "a fresh interpreter, as where CUDA is initialised"])
def test_a_forked_command_prints_what_python_minus_m_prints_and_exits_with_its_status(command, tmp_path,
                                                                                      monkeypatch, cuda):
    monkeypatch.setattr(processes, "cuda_initialised", lambda: cuda)
    output = tmp_path / "out.txt"
    assert wait(fork_command(command, ["3", "x"], output, cwd=tmp_path)) == 3
    printed = output.read_text()
    # none of it kept by this pytest process, which records warnings and log records and collects the exceptions
    # of threads and of __del__
    assert "logged, as a fresh interpreter prints it" in printed and "not logged" not in printed
    assert "UserWarning: shown, as a fresh interpreter shows it" in printed and "hidden" not in printed
    assert "ZeroDivisionError: division by zero" in printed and "raised in __del__, printed" in printed
    assert "RuntimeWarning" not in printed  # runpy's, for a module imported before it runs as __main__
    assert "argv ['3', 'x']" in printed


def test_a_signal_that_kills_a_forked_command_is_its_status_as_subprocess_says(tmp_path, monkeypatch):
    (tmp_path / "killed.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert wait(fork_command("killed", [], tmp_path / "out.txt")) == -signal.SIGKILL


@pytest.mark.parametrize("stderr_apart", [False, True], ids=["merged", "stderr apart"])
def test_a_forked_commands_output_is_its_own_where_an_earlier_command_wrote_the_same_file(command, tmp_path,
                                                                                           stderr_apart):
    # a test's output file beside its tmp_path, whose name a later test of the same name prefix gets again (CI,
    # stop 49: two runs' "resume with" lines in one file)
    output = tmp_path / "run.out"
    for file in (output, output.with_suffix(".err")):
        file.write_text("resume with: an earlier test's command\n")
    forked = ForkedCommand(command, ["0", "x"], tmp_path, output, stderr_apart=stderr_apart)
    stdout, stderr = forked.communicate()
    assert forked.returncode == 0
    assert "earlier test" not in stdout + (stderr or "")
    assert "argv ['0', 'x']" in stdout
    assert stderr is None or "UserWarning: shown" in stderr
