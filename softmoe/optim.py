"""AdamW with its two moments stored in bfloat16: half the moments' memory, 29% less traffic, maths in float32.

Soft MoE S/16 has 40x the parameters of ViT-S/16, so float32 AdamW state is 7.5 GB there and its step moves
28 bytes per parameter (issue 18's floor, ``softmoe/bench/step_floor.py``). With ``state_dtype="bfloat16"`` each
step reads both moments, updates them in float32 exactly as ``torch.optim.AdamW`` does, and writes them back in
bfloat16: 20 bytes per parameter, and 4 bytes of state instead of 8.

Rounding. bfloat16 keeps 8 significant bits, so ``exp_avg_sq * 0.999`` rounds back to ``exp_avg_sq``: rounded to
nearest, the second moment could never decay. ``rounding="stochastic"`` (the default) rounds up with a
probability equal to the dropped fraction, so every stored moment is unbiased. Its random bits are the
parameter's and the gradient's low mantissa bits, xor a hash of the step (no generator state): a resumed run
rounds as the uninterrupted one would, and eager and compiled steps agree. ``"nearest"`` measures what stochastic
rounding buys.

``compile=True`` runs each parameter's update through ``torch.compile``: one fused kernel that reads and writes
each tensor once, where eager runs a dozen passes (float32 moments too). ``state_dtype="float32"`` gives
``torch.optim.AdamW``'s step (``foreach=False``) bit for bit in eager.

The expert banks' bf16 copies. Under autocast an expert bank reads its weights through a bf16 copy that it recasts
after every optimizer step (4 bytes read, 2 written per weight). This optimizer writes that copy from the updated
weight inside the update (``write_expert_copies=True``, the default): compiled, 2 bytes written in the same
kernel, and the next forward casts nothing. The copy is the bank's own cast, bit for bit.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch.optim import Optimizer

from ._checks import require_choice, require_number
from .experts import copy_written, low_precision_copy
from .parallel import local_tensor

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUNDINGS = ("stochastic", "nearest")
# Eager float32 temporaries are made this many elements at a time (16 MB each), not for a whole 75M-element bank.
CHUNK = 1 << 22


def step_bits(step: int, salt: int) -> int:
    """16 bits that change with every step and differ between parameters (a 32-bit integer hash of both)."""
    h = (step * 0x27D4EB2F + salt * 0x165667B1) & 0xFFFFFFFF
    for _ in range(2):
        h ^= h >> 16
        h = (h * 0x45D9F3B) & 0xFFFFFFFF
    return (h ^ (h >> 16)) & 0xFFFF


def rounding_noise(param: torch.Tensor, grad: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """16 pseudo-random bits per element (int32 in [0, 65536)): the low mantissa bits of the float32 parameter
    and gradient, which no moment's rounding depends on, xor ``bits`` (:func:`step_bits`, a 0-d tensor), which
    vary them from step to step even where both are zero. Two cheap passes, where a counter-based hash of each
    element's index cost more integer work than the whole AdamW update; and no generator state, so a resumed run
    and a compiled step draw what the uninterrupted eager one did."""
    return (param.view(torch.int32) ^ grad.view(torch.int32) ^ bits) & 0xFFFF


def round_to_bfloat16(x: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``x`` in bfloat16: to nearest without ``noise``, else stochastically: the 16 bits bfloat16 drops,
    plus ``noise`` uniform in [0, 65536), carry into the kept bits with probability (dropped bits) / 65536.
    Finite float32 bit patterns plus the noise never overflow int32, whatever the sign."""
    if noise is None:
        return x.to(torch.bfloat16)
    bits = (x.view(torch.int32) + noise) & -65536  # magnitude rounded up or down; low bits cleared, so exact below
    return bits.view(torch.float32).to(torch.bfloat16)


def adamw_float32_(param, grad, exp_avg, exp_avg_sq, step: float, lr, beta1, beta2, eps, weight_decay) -> None:
    """``torch.optim.AdamW``'s single-tensor update, in the same order of operations (so bit for bit)."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def adamw_low_precision_(param, grad, exp_avg, exp_avg_sq, decay, step_size, bias_correction2_sqrt, bits,
                         weight_copy=None, *, beta1: float, beta2: float, eps: float, stochastic: bool) -> None:
    """The same update with the moments read into float32 and written back in their own dtype (bf16: rounded as
    ``stochastic`` says, the bits from :func:`rounding_noise`; float32: updated in place). The step's scalars
    (``decay = 1 - lr * weight_decay``, ``step_size = lr / bias_correction1``, ``bias_correction2_sqrt``: float32;
    ``bits``: int32) are computed once per step, in double as torch's AdamW does, and passed as 0-d tensors: a
    compiled step would recompile for every new Python number (dynamo guards on them), and would compute their
    powers for every element. ``weight_copy``: an expert bank's low-precision copy of ``param``, rewritten from
    the updated parameter (compiled, in the same kernel: a 2-byte write instead of the bank's 6-byte recast)."""
    low_precision = exp_avg.dtype != torch.float32
    noise = rounding_noise(param, grad, bits) if stochastic and low_precision else None  # before the update
    param.mul_(decay)
    g = grad.float()
    m = exp_avg.float().lerp_(g, 1 - beta1)  # float32 moments: .float() is the moment itself, updated in place
    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    param.sub_(step_size * (m / denom))
    if low_precision:
        exp_avg.copy_(round_to_bfloat16(m, noise))
        exp_avg_sq.copy_(round_to_bfloat16(v, None if noise is None else noise ^ 0x5A5A))  # other bits for v
    if weight_copy is not None:
        weight_copy.copy_(param)


def check_hyperparameters(values: dict, where: str = "") -> None:
    """Raise a ``ValueError`` naming the first bad value of ``values`` (lr, betas, eps, weight_decay, state_dtype,
    rounding: the constructor's, or a param group's with the defaults it leaves), prefixed with ``where``."""
    try:
        for name in ("lr", "eps", "weight_decay"):
            require_number(name, values[name], minimum=0.0, inclusive=True)
        betas = values["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        require_choice("state_dtype", values["state_dtype"], tuple(STATE_DTYPES))
        require_choice("rounding", values["rounding"], ROUNDINGS)
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None


class AdamW(Optimizer):
    """``torch.optim.AdamW`` (decoupled weight decay) whose moments live in ``state_dtype``.

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        state_dtype: ``"bfloat16"`` (the moments of float32 parameters in bf16) or ``"float32"`` (torch's
            AdamW). Parameters that are not float32 keep moments in their own dtype, as torch's do.
        rounding: how float32 moments become bf16: ``"stochastic"`` (unbiased; see the module docstring) or
            ``"nearest"``.
        compile: run each parameter's update (float32 or bf16 moments) as one ``torch.compile``d kernel; a
            string names the ``torch.compile`` backend (True: inductor's).
        write_expert_copies: where an expert bank keeps an autocast copy of a parameter
            (:meth:`softmoe.experts.BatchedMlp.compute_weight`), rewrite it from the updated parameter in the
            update itself, so the next forward casts nothing. Compiled, that is one 2-byte write per parameter in
            the update's kernel where the bank's recast reads 4 bytes and writes 2; eager, the same pass moves.

    A checkpoint from either optimizer loads into either: the moments are cast to this optimizer's
    ``state_dtype`` (float32 -> bf16 rounds to nearest once), and ``state_dtype``, ``rounding`` stay this
    run's choice whatever the checkpoint's groups say.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_dtype: str = "bfloat16", rounding: str = "stochastic",
                 compile: Union[bool, str] = False, write_expert_copies: bool = True) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        rounding=rounding)
        check_hyperparameters(defaults)  # each param group's own values: add_param_group
        super().__init__(params, {**defaults, "betas": tuple(float(b) for b in betas)})
        if not isinstance(compile, (bool, str)):
            raise ValueError(f"compile must be true, false or a torch.compile backend name, got {compile!r}")
        self.compile = compile
        if not isinstance(write_expert_copies, bool):
            raise ValueError(f"write_expert_copies must be true or false, got {write_expert_copies!r}")
        self.write_expert_copies = write_expert_copies
        self._compiled_update = None
        self._scalars: dict = {}  # this step's 0-d scalar tensors, by (value, dtype, device)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, after the group's own values are checked as the constructor's are (a group may set any of them):
        a bad group is refused before it joins the optimizer."""
        if isinstance(param_group, dict):  # else torch's own error
            check_hyperparameters({**self.defaults, **param_group}, f"param group {len(self.param_groups)}: ")
        super().add_param_group(param_group)

    def _moment_dtype(self, param: torch.Tensor, group: dict) -> torch.dtype:
        return STATE_DTYPES[group["state_dtype"]] if param.dtype == torch.float32 else param.dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._scalars.clear()
        salt = 0  # each parameter's position: its rounding bits differ from every other parameter's
        for group in self.param_groups:
            for param in group["params"]:
                salt += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("softmoe.optim.AdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    dtype = self._moment_dtype(param, group)
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                self._update(param, state, group, salt)
        return loss

    def _update(self, param: torch.Tensor, state: dict, group: dict, salt: int) -> None:
        beta1, beta2 = group["betas"]
        # the update is elementwise: a sharded parameter (FSDP) is updated shard by shard
        p, g, m, v = (local_tensor(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"]))
        weight_copy = low_precision_copy(param) if self.write_expert_copies else None
        if m.dtype == p.dtype and not (self.compile and p.dtype == torch.float32):
            adamw_float32_(p, g, m, v, state["step"].item(), group["lr"], beta1, beta2, group["eps"],
                           group["weight_decay"])
            if weight_copy is not None:
                weight_copy.copy_(p)
        else:
            self._fused_update(p, g, m, v, weight_copy, state, group, salt)
        if weight_copy is not None:
            copy_written(param)

    def _fused_update(self, p, g, m, v, weight_copy, state: dict, group: dict, salt: int) -> None:
        """:func:`adamw_low_precision_` on the local tensors: compiled into one kernel, or eager in chunks."""
        beta1, beta2 = group["betas"]
        if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise ValueError(f"softmoe.optim.AdamW with state_dtype={group['state_dtype']!r} updates contiguous "
                             f"parameters; got one of shape {tuple(p.shape)} with strides {p.stride()}")
        step, lr = state["step"].item(), group["lr"]
        device = p.device
        scalars = [self._scalar(value, torch.float32, device) for value in (
            1 - lr * group["weight_decay"], lr / (1 - beta1**step), (1 - beta2**step) ** 0.5)]
        scalars.append(self._scalar(step_bits(int(step), salt), torch.int32, device))
        constants = dict(beta1=beta1, beta2=beta2, eps=group["eps"], stochastic=group["rounding"] == "stochastic")
        # flat aliases with no base: dynamo guards on a view's base (its rank and strides), which would recompile
        # the update for every parameter shape
        flat = [t.view(-1).detach() for t in (p, g.contiguous(), m, v)]
        flat.append(None if weight_copy is None else weight_copy.view(-1).detach())
        # one fused kernel: no float32 temporaries, so no chunks. A one-element parameter (a layer's scale) runs
        # eagerly: dynamo would compile a graph of its own for size 1
        if self.compile and p.numel() > 1:
            self._compiled()(*flat[:4], *scalars, flat[4], **constants)
        else:
            for start in range(0, p.numel(), CHUNK):
                chunk = [None if t is None else t[start:start + CHUNK] for t in flat]
                adamw_low_precision_(*chunk[:4], *scalars, chunk[4], **constants)

    def _scalar(self, value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``value`` as a 0-d tensor on ``device``, made once per step. ``torch.full`` writes it with a kernel
        argument; ``torch.tensor(value, device=...)`` would copy it from the host and wait for the device."""
        key = (value, dtype, device)
        if key not in self._scalars:
            self._scalars[key] = torch.full((), value, dtype=dtype, device=device)
        return self._scalars[key]

    def _compiled(self):
        if self._compiled_update is None:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            # dynamic: one graph for every parameter size (per moment dtype, and with or without a copy to write),
            # where a static graph per size would pass dynamo's recompile limit (8) on a ViT's parameters. On a
            # GPU the size is one more kernel argument; inductor's CPU kernel for it takes about twice the static
            # one's time (experiments/optimizer_state/step_time.py)
            self._compiled_update = torch.compile(adamw_low_precision_, backend=backend, fullgraph=True, dynamic=True)
        return self._compiled_update

    def load_state_dict(self, state_dict: dict) -> None:
        chosen = [{key: group[key] for key in ("state_dtype", "rounding")} for group in self.param_groups]
        super().load_state_dict(state_dict)  # casts every moment to its parameter's dtype
        for group, choice in zip(self.param_groups, chosen):
            group.update(choice)
            for param in group["params"]:
                state = self.state.get(param, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = state[key].to(self._moment_dtype(param, group))
