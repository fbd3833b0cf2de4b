"""The forked commands of tests/processes.py behave as ``python -m`` would: what they print, their exit status."""

from __future__ import annotations

import signal
import sys

from processes import fork_command, wait

WARNS = '''
import logging, sys, warnings
logging.getLogger("some.module").warning("logged, as a fresh interpreter prints it")
logging.getLogger("some.module").info("not logged, as a fresh interpreter does not print it")
warnings.warn("shown, as a fresh interpreter shows it")
warnings.warn("hidden, as a fresh interpreter hides it", PendingDeprecationWarning)
print("argv", sys.argv[1:])
sys.exit(int(sys.argv[1]))
'''


def test_a_forked_command_prints_its_warnings_and_log_records_and_exits_with_its_own_status(tmp_path, monkeypatch):
    (tmp_path / "warns.py").write_text(WARNS)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # the child inherits it
    output = tmp_path / "out.txt"
    assert wait(fork_command("warns", ["3", "x"], output, cwd=tmp_path)) == 3
    printed = output.read_text()
    assert "UserWarning: shown, as a fresh interpreter shows it" in printed  # not recorded by this pytest process
    assert "logged, as a fresh interpreter prints it" in printed  # not captured by this pytest process
    assert "hidden" not in printed and "not logged" not in printed and "argv ['3', 'x']" in printed


def test_a_signal_that_kills_a_forked_command_is_its_status_as_subprocess_says(tmp_path, monkeypatch):
    (tmp_path / "sleeps.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert wait(fork_command("sleeps", [], tmp_path / "out.txt")) == -signal.SIGKILL
