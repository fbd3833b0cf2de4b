"""Under ``torchrun``: every rank's verdict on the command line, shared before any rank starts the run.

Each rank checks the command line and its node's files before Hydra starts (``train.check_before_hydra``). On one
node every rank reads the same files and refuses alike; on several nodes one node may refuse (its ``data.root``
missing) while the others pass, and those went on into ``init_process_group`` to wait for ranks that had exited,
until torch's timeout. So the ranks meet first in the agent's store (torchrun's, reachable before any process
group exists; ``TORCHELASTIC_USE_AGENT_STORE``): each counts itself, a refusing one leaves its line, and the last
to come tells every rank whether any refused. A refusal then ends every rank of every node, each with one line.

The meeting also keeps a refusing rank alive until every rank has read the verdict: torchrun's agent stops the
other ranks of a node once one exits (a rank stopped before it left its line showed in torchrun's report as
"Signal 15 (SIGTERM)"), and node 0's agent holds the store, which goes with it.

Where a rank never comes (it crashed while starting) the others give up after ``timeout`` and go on as before the
meeting existed: a refusing rank exits, a passing one goes into ``init_process_group``.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Optional

TIMEOUT_S = 120.0


def _meeting() -> Optional[str]:
    """The key prefix of this launch's meeting (a restart of the workers meets afresh), or None outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "WORLD_SIZE" not in os.environ:
        return None
    return f"softmoe/launch/{os.environ.get('TORCHELASTIC_RUN_ID')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT')}"


def _wait_for_all(store, counter: str, world_size: int, deadline: float, verdict: Optional[str] = None) -> str:
    """Count this rank at ``counter``; once every rank has, what the last one found at key ``verdict`` (empty where
    it is unset or not asked for), which it leaves at ``<counter>/all``."""
    if store.add(counter, 1) >= world_size:
        store.set(f"{counter}/all", store.get(verdict) if verdict is not None and store.check([verdict]) else b"")
    # one wait, not a loop of short ones: each that times out prints two lines of c10d warnings. A Ctrl-C is answered
    # after it, but torchrun's agent stops its workers on a Ctrl-C itself
    store.wait([f"{counter}/all"], timedelta(seconds=max(0.0, deadline - time.monotonic())))
    return store.get(f"{counter}/all").decode()


def other_ranks_refusal(refusal: Optional[str], timeout: float = TIMEOUT_S) -> Optional[str]:
    """Meet every rank of the launch with this rank's ``refusal`` (its one line without ``error:``, or None where
    its checks passed). Returns, to a rank that passed, the refusal of another rank where one refused (naming that
    rank and its node); None otherwise. A refusing rank returns once every rank has read the verdict."""
    prefix = _meeting()
    if prefix is None:
        return None
    from torch.distributed import TCPStore

    deadline = time.monotonic() + timeout
    world_size = int(os.environ["WORLD_SIZE"])
    try:
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout))
        if refusal is not None:  # the first refusal is the one every rank names
            where = f"rank {os.environ.get('RANK', '?')} (node {os.environ.get('GROUP_RANK', '?')})"
            store.compare_set(f"{prefix}/refused", "", f"{where} refused the launch: {refusal}")
        verdict = _wait_for_all(store, f"{prefix}/checked", world_size, deadline, verdict=f"{prefix}/refused")
        if verdict:  # the refusing ranks keep the store (node 0's agent) until every rank has read this
            _wait_for_all(store, f"{prefix}/read", world_size, deadline)
    except (KeyError, ValueError, RuntimeError):  # no store to reach, or a rank never came (DistStoreError)
        return None
    return verdict if verdict and refusal is None else None
