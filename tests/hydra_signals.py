"""A Hydra callback that sends this process a signal at a job's start or end: a Ctrl-C at a moment of the sweep's
own code, between its jobs, where no test could time one from outside."""

import os
import signal
from pathlib import Path

from hydra.experimental.callback import Callback


class SignalAtJob(Callback):
    """``+hydra.callbacks.<name>._target_=hydra_signals.SignalAtJob +hydra.callbacks.<name>.job=0``: the signal
    (``signal``, by name) goes to this process when job ``job`` ends (``at=on_job_end``) or starts
    (``at=on_job_start``), once: not again after ``once`` (a file it writes) exists, so a pasted rerun runs on."""

    def __init__(self, job: int, once: str, at: str = "on_job_end", signal: str = "SIGINT") -> None:
        self.job, self.once, self.at, self.signal = job, Path(once), at, signal

    def _send(self, config, at: str) -> None:
        if at == self.at and config.hydra.job.num == self.job and not self.once.exists():
            self.once.write_text(self.signal)
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_job_start(self, config, **kwargs) -> None:
        self._send(config, "on_job_start")

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self._send(config, "on_job_end")
