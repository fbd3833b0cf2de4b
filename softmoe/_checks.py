"""Argument checks shared by the library: one clear ``ValueError`` per bad argument.

Errors name the argument, the value given and what is allowed, so a typo never surfaces as a
shape error from deep inside an einsum.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Optional

import torch


def is_int(value: Any) -> bool:
    """An integer (an int, a NumPy integer: any ``numbers.Integral``), and not a bool (``True`` is an int to Python,
    never a count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def require_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is an integer >= 1, else raise naming ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def require_number(name: str, value: Any, *, minimum: float, inclusive: bool) -> float:
    """Return ``value`` as a float if it is a finite number above ``minimum`` (or equal to it when ``inclusive``),
    else raise naming ``name``."""
    if is_number(value) and (value >= minimum if inclusive else value > minimum):
        return float(value)
    bound = f">= {minimum}" if inclusive else f"> {minimum}"
    raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def require_probability(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a number in [0, 1] (a dropout rate), else raise naming ``name``."""
    if is_number(value) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def require_positive_number(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise naming ``name``."""
    return require_number(name, value, minimum=0, inclusive=False)


def require_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is True or False, else raise naming ``name`` (``bool("no")`` is True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def require_module_class(name: str, value: Any) -> Any:
    """Return ``value`` if it can build modules: an ``nn.Module`` class or a callable returning one, not a module
    instance (called to build each module, an instance would be called on no input), else raise naming ``name``."""
    if not callable(value):
        raise ValueError(f"{name} must be an nn.Module class or a callable returning one, got {value!r}")
    if isinstance(value, torch.nn.Module):
        kind = type(value).__name__
        raise ValueError(
            f"{name} must be an nn.Module class or a callable returning one, got a {kind} instance: pass the class "
            f"and its arguments ({name}={kind}, ...) or functools.partial({kind}, ...)"
        )
    return value


def require_module(name: str, value: Any, what: str = "an nn.Module") -> torch.nn.Module:
    """Return ``value`` if it is an ``nn.Module``, else raise naming ``name``: a model given as its name or its state
    dict would fail deep inside, on the first module method called."""
    if not isinstance(value, torch.nn.Module):
        raise ValueError(f"{name} must be {what}, got {type(value).__name__} {value!r:.60}")
    return value


def require_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming ``name``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def is_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace``, ``torch.export`` or ``torch.compile`` traces the code.

    Input checks are skipped then: FX proxies have no concrete shape to check, and under dynamo the checks
    would only add guards. They run on every eager call.
    """
    return torch.compiler.is_compiling() or _is_fx_symbolic_tracing()


# Autocast is always available on these; asking torch is for other devices only: torch 2.11's dynamo cannot trace
# the question (a graph break at every call, and an error under fullgraph=True)
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def autocast_dtype_on(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast computes matmuls in on ``device``; None when autocast is off there."""
    if device.type == "meta" or (device.type not in _AUTOCAST_DEVICE_TYPES
                                 and not torch.amp.is_autocast_available(device.type)):
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def is_exporting() -> bool:
    """True while ``torch.export`` traces the code, and only then. Not ``torch.compiler.is_exporting()``, which
    torch 2.11's dynamo folds to True under every ``torch.compile`` (2.14 reads the flag, as this does): on 2.11 a
    compiled model skipped its input checks and cast its expert weights in the graph as if exported."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)  # the flag torch.export sets while it traces
    return torch.compiler.is_exporting() if flag is None else bool(flag)


# is_fx_symbolic_tracing: torch 2.11 and 2.14 have it, 2.8 only is_fx_tracing (the same flag there)
_is_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                                  torch.fx._symbolic_trace.is_fx_tracing)


def require_parameter_device(name: str, x: torch.Tensor, parameter: torch.Tensor, owner: str) -> None:
    """Check that the tensor ``x`` is on the device of the ``owner``'s (``layer``, ``model``) ``parameter``: torch's
    own error names neither (a bmm's "found at least two devices", a convolution's "Input type and weight type"),
    and a model left on the meta device returns meta tensors for CPU inputs without one."""
    if x.device != parameter.device and parameter.device.type == "meta":
        raise ValueError(
            f"{name} is on {x.device}, but the {owner}'s parameters are on the meta device (shapes, no values): "
            f"materialise it first ({owner}.to_empty(device={str(x.device)!r}), then load or initialise its weights)"
        )
    if x.device != parameter.device:
        raise ValueError(
            f"{name} is on {x.device}, but the {owner}'s parameters are on {parameter.device}: move one to the other "
            f"(x.to({str(parameter.device)!r}) or {owner}.to({str(x.device)!r}))"
        )


def require_parameter_dtype(name: str, x: torch.Tensor, parameter: torch.Tensor, owner: str) -> None:
    """Check that the tensor ``x`` is floating-point, in the dtype of the ``owner``'s (``layer``, ``model``)
    ``parameter`` unless autocast casts both."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    # autocast, where it is on, casts x and the weights to one dtype; float64 it leaves alone
    if x.dtype != parameter.dtype and (x.dtype == torch.float64 or autocast_dtype_on(x.device) is None):
        autocast = "" if x.dtype == torch.float64 else ", or run under torch.autocast"  # which leaves float64 alone
        raise ValueError(
            f"{name} dtype {x.dtype} does not match the {owner}'s parameters ({parameter.dtype}): cast one to the "
            f"other (x.to({parameter.dtype}) or {owner}.to({x.dtype})){autocast}"
        )


def functorch_transforms_active() -> bool:
    """True inside ``torch.func.grad`` / ``vmap`` / ``jacrev`` / ...: an ``autograd.Function`` written the old way
    (``forward(ctx, ...)``, as the layer's fused nodes are) cannot run there, so plain ops take their place."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and active()


def is_symbolically_traced() -> bool:
    """True while ``torch.fx.symbolic_trace`` or ``torch.export`` traces the code: proxies or symbolic shapes, so no
    input check can run. Unlike :func:`is_tracing`, not under ``torch.compile``, where a check on the input's shape
    runs as in eager mode (dynamo guards on it)."""
    return _is_fx_symbolic_tracing() or is_exporting()


def require_tokens(name: str, x: Any, dim: int, parameter: torch.Tensor) -> None:
    """Check that ``x`` is a floating-point [batch, tokens, dim] tensor with at least one token, in the dtype of the
    layer's ``parameter`` unless autocast casts both (eager calls, and under ``torch.compile``: dynamo guards on
    these static properties anyway, and a wrong input then gets this line, not an error from inside the graph)."""
    if is_symbolically_traced():
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape [batch, tokens, {dim}], got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [batch, tokens, {dim}], got a tensor of shape {list(shape)}")
    require_parameter_device(name, x, parameter, "layer")
    require_parameter_dtype(name, x, parameter, "layer")
    if shape[-1] != dim:
        raise ValueError(f"{name} last dimension must equal dim={dim}, got shape {list(shape)}")
    if shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got shape {list(shape)}")


def require_expert_output(layer: Callable[[], str], output: Any, slots: torch.Tensor, stacked: bool) -> Any:
    """Return ``output`` if it is what an expert must return for its ``slots``, one [batch, slots_per_expert, d']
    tensor (``stacked``: every expert's, [batch, num_experts, slots_per_expert, d']), else raise naming the layer,
    ``layer()`` (eager calls only). ``slots``: the bank's [batch, num_experts, slots_per_expert, dim]."""
    if is_tracing():
        return output
    shape = list(output.shape) if isinstance(output, torch.Tensor) else None
    if shape is not None and stacked and len(shape) > 1:
        del shape[1]
    b, p, d = slots.shape[0], slots.shape[2], slots.shape[3]
    if shape is not None and len(shape) == 3 and shape[:2] == [b, p]:
        return output
    returned = f"a tensor of shape {shape}" if shape is not None else f"a {type(output).__name__}"
    raise ValueError(f"each expert must return a tensor of shape [batch, slots_per_expert, d'] for its [batch, "
                     f"slots_per_expert, dim] slots, here [{b}, {p}, {d}] -> [{b}, {p}, d'], but {layer()} returned "
                     f"{returned}")


def require_slots(slots: torch.Tensor, num_experts: int, dim: Optional[int] = None) -> None:
    """Check that a bank of ``num_experts`` can take ``slots`` [batch, num_experts, slots_per_expert, dim] (eager
    calls only: the Soft MoE layer always passes that shape; a user calling a bank directly may not)."""
    if is_tracing():
        return
    shape = list(getattr(slots, "shape", ()))
    if len(shape) != 4 or shape[1] != num_experts or (dim is not None and shape[3] != dim):
        width = "dim" if dim is None else f"in_features={dim}"
        raise ValueError(f"slots must have shape [batch, num_experts={num_experts}, slots_per_expert, {width}], "
                         f"got {shape}")
