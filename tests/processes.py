"""Commands the tests run as a user would: in their own process, with this checkout importable."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from(cwd, command, env=None) -> subprocess.CompletedProcess:
    """``command`` run in ``cwd`` (``env`` added to this process's environment), after it succeeded."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed
