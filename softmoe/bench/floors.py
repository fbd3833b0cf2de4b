"""What the machine can do, measured in the same rounds as the layer: the GEMM rate of each dtype, the copy
bandwidth, a bare batched GEMM at the experts' shape, and the layer's attainable time: the bare matmuls it
must compute, at its own shapes, into preallocated outputs."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from .shapes import LayerShape, Matmul
from .timing import median


def ceiling_cases(device: torch.device, gemm_size: int, copy_mib: int, dtypes: List[torch.dtype]):
    """The GEMM-rate probes (one per dtype) and the bandwidth probe, and the function turning their times into rates."""
    cases: Dict[str, Callable[[], None]] = {}
    for dtype in dtypes:
        a = torch.randn(gemm_size, gemm_size, device=device, dtype=dtype)
        b = torch.randn(gemm_size, gemm_size, device=device, dtype=dtype)
        product = torch.empty(gemm_size, gemm_size, device=device, dtype=dtype)
        cases[f"gemm_{_name(dtype)}"] = lambda a=a, b=b, product=product: torch.mm(a, b, out=product)
    source = torch.randn(copy_mib * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # touch every page before timing
    cases["copy"] = lambda: target.copy_(source)

    def rates(times) -> dict:
        result = {"gemm_size": gemm_size, "copy_bytes": 2 * source.numel() * 4,
                  "copy_bytes_per_s": 2 * source.numel() * 4 / median(times["copy"]["total"]),
                  "copy_seconds": times["copy"]["total"]}
        for dtype in dtypes:
            seconds = times[f"gemm_{_name(dtype)}"]["total"]
            result[f"gemm_{_name(dtype)}_flops_per_s"] = 2 * gemm_size**3 / median(seconds)
            result[f"gemm_{_name(dtype)}_seconds"] = seconds
        return result

    return cases, rates


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def expert_gemm_case(shape: LayerShape, device, rows: int, dtype: torch.dtype = torch.float32):
    """One bare batched GEMM like the experts' first layer: num_experts x [rows, dim] @ [dim, hidden].

    With rows = batch x slots_per_expert it is what the layer runs; more rows show what a larger
    batch would buy: GEMMs with few rows per weight matrix reach a smaller share of the GEMM rate."""
    x = torch.randn(shape.num_experts, rows, shape.dim, device=device, dtype=dtype)
    weight = torch.randn(shape.num_experts, shape.dim, shape.hidden, device=device, dtype=dtype)
    out = torch.empty(shape.num_experts, rows, shape.hidden, device=device, dtype=dtype)

    def expert_gemm():
        torch.bmm(x, weight, out=out)

    return expert_gemm, 2 * shape.num_experts * rows * shape.dim * shape.hidden


def _products(mm: Matmul, device, dtype) -> List[Callable[[], None]]:
    """Forward C = A·B, and backward dA = dC·Bᵀ, dB = Aᵀ·dC, laid out as autograd's bmm backward reads them."""
    a = torch.randn(mm.batch, mm.rows, mm.inner, device=device, dtype=dtype)
    b = torch.randn(mm.batch, mm.inner, mm.cols, device=device, dtype=dtype)
    c = torch.empty(mm.batch, mm.rows, mm.cols, device=device, dtype=dtype)
    grad_c = torch.randn_like(c)
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    return [lambda: torch.bmm(a, b, out=c),
            lambda: torch.bmm(grad_c, b.transpose(1, 2), out=grad_a),
            lambda: torch.bmm(a.transpose(1, 2), grad_c, out=grad_b)]


def attainable_cases(shape: LayerShape, device, dtype) -> Tuple[Dict[str, Callable[[], None]], Dict[str, int]]:
    """The layer's attainable time: its 5 forward matmuls, and with them the 10 of backward, bare."""
    products = [_products(mm, device, dtype) for mm in shape.forward_matmuls()]

    def forward():
        for forward_product, _, _ in products:
            forward_product()

    def forward_backward():
        for calls in products:
            for call in calls:
                call()

    flops = {"forward": shape.flops(backward=False), "forward_backward": shape.flops(backward=True)}
    return {"forward": forward, "forward_backward": forward_backward}, flops


def expert_bank_cases(shape: LayerShape, device, dtype) -> Tuple[Dict[str, Callable[[], None]], str]:
    """The experts' two forward GEMMs (fc1, fc2: ``num_experts`` x [rows, ...]) through ``torch.bmm`` and through
    ``torch._grouped_mm`` (its batched 3-d form), to time side by side; the second case is left out, with the
    reason returned, where this torch or device cannot run it (it needs bf16 and an sm90 GPU on CUDA)."""
    fc1, fc2 = (mm for mm in shape.forward_matmuls() if mm.name.startswith("experts"))
    x = torch.randn(fc1.batch, fc1.rows, fc1.inner, device=device, dtype=dtype)
    w1 = torch.randn(fc1.batch, fc1.inner, fc1.cols, device=device, dtype=dtype)
    w2 = torch.randn(fc2.batch, fc2.inner, fc2.cols, device=device, dtype=dtype)
    cases: Dict[str, Callable[[], None]] = {"experts_bmm": lambda: torch.bmm(torch.bmm(x, w1), w2)}
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        return cases, f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        grouped_mm(grouped_mm(x, w1), w2)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        return cases, f"torch._grouped_mm cannot run here: {str(error).splitlines()[0]}"
    cases["experts_grouped_mm"] = lambda: grouped_mm(grouped_mm(x, w1), w2)
    return cases, ""
