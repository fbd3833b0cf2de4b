"""A run with ``logger=none`` needs no wandb: a GPU machine can carry the code and the data without its 31 MB.

The test hides wandb behind a stand-in package that records who imports it and raises ImportError, as an
environment without wandb would. timm tries ``import wandb`` itself (``timm/utils/summary.py``, inside a
``try``), so the rule tested is: no module of ours imports it, and the run does not need it.

The same run checks that scikit-learn is not imported either: its import took about a second of every run's
start, for the digits file and two index draws (softmoe/harness/data/split_draws.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

STAND_IN = '''
import os, traceback
importer = next(frame.filename for frame in reversed(traceback.extract_stack()[:-1])
                if not frame.filename.startswith("<frozen"))
with open(os.environ["WANDB_IMPORTERS"], "a") as log:
    log.write(importer + "\\n")
raise ImportError("No module named 'wandb' (hidden by tests/test_without_wandb.py)")
'''


@pytest.mark.slow
def test_a_logger_none_run_trains_without_wandb_and_no_module_of_ours_imports_it_or_scikit_learn(tmp_path):
    (tmp_path / "hidden" / "wandb").mkdir(parents=True)
    (tmp_path / "hidden" / "wandb" / "__init__.py").write_text(STAND_IN)
    importers = tmp_path / "importers.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hidden"), str(ROOT)]),
           "WANDB_IMPORTERS": str(importers), "PYTHONPROFILEIMPORTTIME": "1"}  # each import on stderr
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "softmoe.train", "logger=none", "trainer.max_steps=2", "trainer.eval_batches=1",
               "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("test/acc" in event for event in events)
    tried = set(importers.read_text().split()) if importers.exists() else set()
    # a path below the checkout, not an installed package (a virtual environment may sit inside it, or beside it
    # with the same prefix: /tmp/ci and /tmp/civenv)
    ours = {path for path in tried if Path(path).is_relative_to(ROOT) and "site-packages" not in Path(path).parts}
    assert not ours, f"modules of ours import wandb under logger=none: {sorted(ours)}"
    assert all(os.sep + "timm" + os.sep in path for path in tried), tried  # timm's optional import only
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "sklearn" not in imported  # the digits and both splits read without it
