"""What the training loop does when the run is interrupted or its numbers go bad.

Interruption (:class:`PreemptionGuard`): SIGINT (Ctrl-C), SIGTERM, SIGUSR1 and SIGUSR2 (submitit's
preemption signal on SLURM), and SIGHUP (the terminal closed; not under ``nohup``, which ignores it) only set a flag;
the loop finishes the step it is in, writes ``last.pt`` and raises :class:`Preempted`, which ``python -m
softmoe.train`` turns into one line naming the command that resumes (``resume_hint.py``) and exit status ``128 +
signal`` (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1, 140 for SIGUSR2, 129 for SIGHUP), the status a shell
gives a process the signal killed. A handler installed before ours (submitit's requeue) is
then called, so SLURM requeues the job and the new job resumes from ``last.pt``. A second Ctrl-C ends the process
at once, without saving: the kernel gives SIGINT back its default action as it delivers the first one
(:func:`reset_on_delivery`), so it ends the process even inside a long C++ op, where no Python handler could run (the
shell reports status 130; the last ``last.pt`` is kept). Inside such an op the first signal is still answered at
once: a thread of the guard's (:class:`SignalWatcher`) says "stopping after this step" while the op runs.

Non-finite numbers (:class:`NonFiniteGuard`): a step whose loss or gradient norm is NaN or inf never
changes the weights. ``trainer.nonfinite=skip`` drops the step and counts it (``train/skipped_steps``),
and stops after ``trainer.max_nonfinite_skips`` such steps in a row; ``stop`` stops. Stopping raises
:class:`NonFiniteError` naming the step (exit status 3). :func:`first_nonfinite` keeps a NaN weight out of every
checkpoint.

Where the check runs. An optimizer that can skip a step itself (fused AdamW, Adam or SGD: ``optimizer.fused=true``,
or the default null on a GPU; they take the ``found_inf`` flag PyTorch's ``GradScaler`` uses) gets the flag on the
device: it leaves the weights, its moments and its step count as they were, and the host reads the counts only on
logging steps, before each checkpoint and at the end. A stop then comes at the next of these (at most
``trainer.log_every`` steps late; the skipped steps changed nothing), and its message cannot name the layer whose
gradient went bad. With any other optimizer (the CPU default), or with fp16 loss scaling, whether to call
``optimizer.step()`` must be decided on the host: one boolean read per step, free on a CPU, one device sync per
step on an accelerator; a stop comes at once and names the first non-finite gradient.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from .checkpoint import LAST
from .errors import NONFINITE_EXIT_CODE, NonFiniteError, preempted_exit_code
from .rules import counted
from .sweep_console import EVERY_JOB

log = logging.getLogger(__name__)

# SIGHUP: the terminal or the ssh session closed (it killed the run, losing the steps since its last checkpoint)
PREEMPTION_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
NONFINITE_POLICIES = ("skip", "stop")
__all__ = [
    "NONFINITE_EXIT_CODE", "NonFiniteError", "NonFiniteGuard", "Preempted", "PreemptionGuard", "preempted_exit_code"
]


class Preempted(Exception):
    """The run saved ``checkpoint`` (``last.pt``, or FSDP's ``last.dcp``) at ``step`` and stopped because it
    received ``signum``."""

    def __init__(
        self, signum: int, step: int, handover: Callable[[], None] = lambda: None, checkpoint: str = LAST
    ) -> None:
        self.signum, self.step, self.handover = int(signum), step, handover
        self.exit_code = preempted_exit_code(signum)
        super().__init__(
            f"{signal.Signals(signum).name} received: saved {checkpoint} at step {step} (exit status {self.exit_code})"
        )


class TerminatedEarly(KeyboardInterrupt):
    """SIGTERM before a run's :class:`PreemptionGuard` took over (loading the data, building the model): the start
    ends as a Ctrl-C there does, in one line and leaving no run directory, with SIGTERM's exit status. (It ended the
    process silently, its run directory left behind.)"""

    signum = signal.SIGTERM


def _terminated_early(signum: int, frame: Optional[FrameType]) -> None:
    raise TerminatedEarly()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`TerminatedEarly` where it has its default action (not where a
    launcher or a sweep set its own, or ignores it); the guard a run installs meanwhile takes it over while it
    trains. The main thread only, as every signal handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminated_early)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class PreemptionGuard:
    """A context in which the preemption signals and Ctrl-C ask the loop to stop after its step instead of killing it.

    ``received`` is the first signal this process received, or None; ``requested`` the one the loop acts on: the
    same in one process, and under torchrun the one every rank agreed on (``Distributed.share_signal`` sets it from
    every rank's ``received``, so a signal arriving while the ranks exchange theirs is kept for the next
    exchange, never lost). After the first SIGINT a second one ends the process at once, whatever op is running
    (the user insists): the kernel gives SIGINT back its default action as it delivers the first one. Outside the
    main thread (where Python cannot install handlers) the guard does nothing and the signals keep their usual effect.
    """

    def __init__(
        self,
        signals: Iterable[int] = PREEMPTION_SIGNALS,
        checkpoint: str = LAST,
        stop_requested: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        self.signals = tuple(signals)
        self.checkpoint = checkpoint  # what the stop saves: last.pt, or FSDP's last.dcp
        # a stop asked for without a signal to this process (a parallel sweep stopped: sweep_stop.py); read once a step
        self.stop_requested = stop_requested
        self.received: Optional[int] = None
        self.requested: Optional[int] = None
        self._owner = os.getpid()  # DataLoader workers fork with this handler; Ctrl-C reaches them too
        self._previous: dict[int, Any] = {}
        self._announced: dict[str, object] = {}  # who said "stopping after this step": the handler or the watcher
        self._watcher: Optional[SignalWatcher] = None
        self.trained = False  # set once the last step is saved: a signal then stops nothing, the test just ends the run

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._owner:  # a forked worker: the training process decides, and stops it
            return
        if self.received is None:
            self.received = self.requested = signum
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # where the kernel could not reset it (not Linux)
        self._announce(signum)

    def _watched(self, signum: int) -> None:
        # a signal handled by someone else now (a guard installed after this one) is not ours to announce
        if signum in self.signals and signal.getsignal(signum) == self._handle:
            self._announce(signum)

    def _announce(self, signum: int) -> None:
        """Say once that the run stops after this step, from whichever sees the first signal first: the handler
        (main thread, between bytecodes) or the watcher (its own thread, at once, even while a long op runs). Only
        the handler changes the state: the loop and ``Distributed.share_signal`` read it in the main thread."""
        me = object()
        if self._announced.setdefault("by", me) is not me:  # one step under the GIL, even in a nested handler
            return
        name = signal.Signals(signum).name
        if self.trained:  # was "stopping after this step, saving last.pt", then the test ran on and the run exited 0
            again = "; Ctrl-C again ends the process at once (a rerun then tests it)" if signum == signal.SIGINT else ""
            log.warning("%s received after the last step, whose %s is saved: the run ends once its test is done%s",
                        name, self.checkpoint, again, extra=EVERY_JOB)
            return
        again = "; Ctrl-C again ends the process at once, without saving this step" if signum == signal.SIGINT else ""
        log.warning("%s received: stopping after this step, saving %s%s", name, self.checkpoint, again, extra=EVERY_JOB)

    def check_stop_requested(self) -> None:
        """Act on :attr:`stop_requested` as on the signal it names, if no signal came first."""
        if self.received is None and self.stop_requested is not None:
            signum = self.stop_requested()
            if signum is not None:
                self.received = self.requested = signum
                self._announce(signum)

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # started under nohup: the run is meant to outlive its terminal, and still does
                self._previous[signum] = signal.signal(signum, self._handle)
            if signal.SIGINT in self.signals:
                reset_on_delivery(signal.SIGINT)
            self._watcher = SignalWatcher(self._watched).start()
        return self

    def restore(self) -> None:
        """Put back the handlers found at :meth:`install`."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    __enter__ = install

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()

    def handover(self) -> Callable[[], None]:
        """Calls the handler the received signal had before ours, if it was a Python function (submitit's
        checkpoint-and-requeue on SLURM); call it after ``last.pt`` is written."""
        signum, previous = self.requested, self._previous.get(self.requested)

        def call() -> None:
            # Python's own SIGINT handler would raise KeyboardInterrupt: the run has already stopped cleanly
            # ... and ours for SIGTERM before a run's guard (sigterm_interrupts) would raise TerminatedEarly
            if signum is not None and callable(previous) and previous not in (signal.default_int_handler,
                                                                              _terminated_early):
                previous(signum, None)

        return call


class SignalWatcher:
    """Calls ``on_signal(signum)`` from a thread of its own as soon as a signal with a Python handler arrives, even
    while the main thread is inside a long C++ op (a step of minutes), where the handler itself cannot run yet.

    Python's C-level handler writes each signal's number to the wakeup fd (:func:`signal.set_wakeup_fd`) at once;
    this thread reads it. It runs whenever the main thread releases the GIL, which torch's ops do. One watcher at a
    time (the wakeup fd is one per process): :meth:`stop` puts back the one found at :meth:`start`. Main thread only.
    """

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self.on_signal = on_signal
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # set_wakeup_fd's requirement: a signal handler never blocks
        self._previous_fd = -1
        self._thread = threading.Thread(target=self._run, name="softmoe-signal-watcher", daemon=True)

    def start(self) -> "SignalWatcher":
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        _watcher_fds.update((self._read, self._write))
        self._thread.start()
        return self

    def _run(self) -> None:
        with os.fdopen(self._read, "rb", buffering=0) as wakeups:
            while True:
                data = wakeups.read(64)
                if not data or 0 in data:  # closed, or stop()'s 0 (no signal has number 0)
                    return
                for signum in data:
                    self.on_signal(signum)

    def stop(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)  # first: Python's handler must not write to a closed fd
        _watcher_fds.difference_update((self._read, self._write))  # the thread closes the read end
        with contextlib.suppress(OSError):
            os.write(self._write, b"\0")
        os.close(self._write)
        self._thread.join()  # it has acted on every signal that came before: nothing is said after the guard ends


_watcher_fds: set[int] = set()  # the pipe of each running watcher


def _no_watcher_in_a_forked_child() -> None:
    """A forked child (a DataLoader worker) inherits the wakeup fd and the pipe, not the thread: its signals would
    reach the parent's watcher, which would announce a SIGTERM sent to a worker alone. The child lets them go."""
    if _watcher_fds:
        with contextlib.suppress(ValueError):  # forked from a thread other than the main one
            signal.set_wakeup_fd(-1)
        for fd in _watcher_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _watcher_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_no_watcher_in_a_forked_child)


class _SigAction(ctypes.Structure):
    """Linux's ``struct sigaction`` (glibc and musl, every architecture we run on): handler, 1024-bit mask, flags."""

    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


SA_RESETHAND = 0x80000000  # Linux: the kernel gives the signal back its default action as it delivers it


def reset_on_delivery(signum: int) -> bool:
    """Make the kernel restore ``signum``'s default action when it delivers it to the handler installed now, so that
    a second ``signum`` ends the process wherever it is. A Python handler runs only between bytecodes, never inside a
    long C++ op (one step of a model too large for the CPU can take minutes): had the handler itself to restore the
    default, the second Ctrl-C would wait for the op. Returns whether it could (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        action = _SigAction()
        if libc.sigaction(signum, None, ctypes.byref(action)) != 0:
            return False
        action.flags |= ctypes.c_int(SA_RESETHAND).value
        return libc.sigaction(signum, ctypes.byref(action), None) == 0
    except (OSError, AttributeError):
        return False


def first_nonfinite(named_tensors: Iterable[tuple[str, Optional[torch.Tensor]]]) -> Optional[str]:
    """The name of the first tensor holding a NaN or inf (None-valued entries are skipped), else None."""
    for name, tensor in named_tensors:
        if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def first_nonfinite_grad(model: nn.Module) -> Optional[str]:
    return first_nonfinite((name, parameter.grad) for name, parameter in model.named_parameters())


class NonFiniteGuard:
    """Decides, after backward and before the optimizer step, whether a step's numbers may be applied.

    Args:
        policy: ``skip`` (drop the step, count it) or ``stop`` (raise :class:`NonFiniteError`).
        max_skips: consecutive skipped steps after which ``skip`` stops too (a run that only makes NaNs).
        device: where the counts live when ``on_device``.
        on_device: the optimizer skips a flagged step itself (:meth:`flag`) and the host reads the counts in
            :meth:`settle`; otherwise :meth:`step_is_finite` answers on the host, every step.
    """

    def __init__(
        self, policy: str, max_skips: int, device: Optional[torch.device] = None, on_device: bool = False
    ) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"trainer.nonfinite={policy}: must be one of {', '.join(NONFINITE_POLICIES)}")
        self.policy, self.max_skips, self.on_device = policy, max_skips, on_device
        self.skipped = 0  # steps skipped in the whole run (on the device: as of the last settle)
        self.consecutive = 0
        self._counts = self._fresh_counts(device, consecutive=0)

    @staticmethod
    def _fresh_counts(device: Optional[torch.device], consecutive: int) -> torch.Tensor:
        # The on-device counts since the last settle, one float64 vector so that settle reads them at once:
        # [skipped, bad steps in a row now, step the limit was passed (-1), first bad step (-1), its loss, its norm]
        return torch.tensor([0, consecutive, -1, -1, 0, 0], dtype=torch.float64, device=device)

    def step_is_finite(
        self, step: int, loss: torch.Tensor, grad_norm: Union[torch.Tensor, float], model: nn.Module
    ) -> bool:
        """True when ``loss`` and ``grad_norm`` (the global gradient norm, so one check covers every
        gradient) are finite; else counts a skip or raises. ``step`` is 1-based, as logged."""
        loss = loss.detach()
        finite = torch.isfinite(loss) & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
        if finite.item():  # the one host read per step
            self.consecutive = 0
            return True
        layer = first_nonfinite_grad(model)
        what = describe_nonfinite(float(loss), float(grad_norm))
        where = f"first non-finite gradient in {layer}" if layer else "every gradient finite"
        if self.policy == "stop":
            raise NonFiniteError(f"step {step}: {what} ({where}); trainer.nonfinite=stop")
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive > self.max_skips:
            raise NonFiniteError(
                f"step {step}: {what} ({where}) in {counted(self.consecutive, 'step')} in a row, more than "
                f"trainer.max_nonfinite_skips={self.max_skips}"
            )
        log.warning(
            "step %d: %s (%s); step skipped (trainer.nonfinite=skip), %d so far", step, what, where, self.skipped
        )
        return False

    def flag(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """On the device, without waiting for it: 1.0 when ``loss`` or ``grad_norm`` is not finite, else 0.0 (the
        ``found_inf`` on which a fused optimizer skips its step); counts the step for :meth:`settle`."""
        loss, grad_norm = loss.detach().double(), grad_norm.detach().double()
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        skipped, in_a_row, over, first, first_loss, first_norm = self._counts.unbind()
        in_a_row = (in_a_row + 1) * bad
        passed, is_first = (in_a_row > self.max_skips) & (over < 0), bad & (first < 0)
        self._counts = torch.stack([
            skipped + bad, in_a_row, torch.where(passed, step, over), torch.where(is_first, step, first),
            torch.where(is_first, loss, first_loss), torch.where(is_first, grad_norm, first_norm),
        ])
        return bad.float()

    def settle(self, step: int) -> None:
        """Read the on-device counts (one host read) and act on the steps skipped since the last settle: warn, or
        raise :class:`NonFiniteError` (``stop``, or too many in a row). ``step``: the last step taken."""
        if not self.on_device:
            return
        skipped, in_a_row, over, first, loss, norm = self._counts.tolist()  # the one host read
        self.consecutive = int(in_a_row)
        if skipped == 0:
            return
        what, checked = describe_nonfinite(loss, norm), f"checked on the device at step {step}"
        if self.policy == "stop":
            raise NonFiniteError(f"step {int(first)}: {what} ({checked}); trainer.nonfinite=stop")
        if over >= 0:
            run = f"steps {int(over) - self.max_skips}-{int(over)}"
            raise NonFiniteError(
                f"step {int(over)}: a non-finite loss or gradient norm in {counted(self.max_skips + 1, 'step')} in a "
                f"row ({run}), more than trainer.max_nonfinite_skips={self.max_skips} ({checked})"
            )
        self.skipped += int(skipped)
        log.warning(
            "step %d: %s (%s); %s skipped since the last check (trainer.nonfinite=skip), %d so far",
            int(first), what, checked, counted(int(skipped), "step"), self.skipped,
        )
        self._counts = self._fresh_counts(self._counts.device, self.consecutive)  # a run of bad steps carries over

    def state_dict(self) -> dict[str, int]:
        """The counts as of the last :meth:`settle` (on the device; call it first)."""
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]
        self._counts = self._fresh_counts(self._counts.device, self.consecutive)


def describe_nonfinite(loss: float, grad_norm: float) -> str:
    """What went bad: the loss if it did, else the gradient norm."""
    return f"loss={loss}" if not math.isfinite(loss) else f"gradient norm={grad_norm}"
