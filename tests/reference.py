"""An independent float64 implementation of the paper's equations (section 2), for the tests.

Written from the paper's table of symbols with einsums over named axes, sharing no code with
softmoe.layer, so a mistake in one is not repeated in the other.
"""

import torch


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact||, in float64: how far a low-precision result is from the float32 one."""
    approx, exact = approx.detach().double(), exact.detach().double()
    return ((approx - exact).norm() / exact.norm()).item()


# bf16 keeps 8 significant bits (a unit roundoff of 2^-8 = 3.9e-3). Measured against float32 (8 seeds each): the
# tiny layer's output 2.7e-3 to 4.8e-3 (under autocast and cast to bf16), its routing weights at most 8.5e-4, and
# the tiny ViT's logits 2.5e-3 to 6.4e-3. Bugs the bound must catch are far above it: the same layer with uniform
# routing is 0.11-0.28 away, the ViT's two examples swapped 0.25-0.67.
BF16_RELATIVE_ERROR = 2e-2


def reference_routing(x, phi, scale=1.0, normalize=True):
    """Dispatch and combine weights [b, m, n, p] for tokens x [b, m, d] and slots phi [d, n, p]."""
    x, phi = x.double(), phi.double()
    if normalize:
        x = x / torch.sqrt((x**2).sum(-1, keepdim=True) + 1e-6)
        phi = scale * phi / torch.sqrt((phi**2).sum(0, keepdim=True) + 1e-6)
    logits = torch.einsum("bmd,dnp->bmnp", x, phi)
    b, m, n, p = logits.shape
    dispatch = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    dispatch = dispatch / dispatch.sum(dim=1, keepdim=True)  # over the m tokens, per slot
    flat = logits.reshape(b, m, n * p)
    combine = torch.exp(flat - flat.amax(dim=-1, keepdim=True))
    combine = (combine / combine.sum(dim=-1, keepdim=True)).reshape(b, m, n, p)  # one softmax over all slots
    return dispatch, combine


def reference_soft_moe(x, phi, expert_fns, scale=1.0, normalize=True):
    """Y for tokens x [b, m, d]; expert_fns[i] maps expert i's slots [b, p, d] to [b, p, d']."""
    dispatch, combine = reference_routing(x, phi, scale, normalize)
    slots = torch.einsum("bmd,bmnp->bnpd", x.double(), dispatch)  # un-normalised tokens
    outputs = torch.stack([fn(slots[:, i]) for i, fn in enumerate(expert_fns)], dim=1)
    return torch.einsum("bnpd,bmnp->bmd", outputs, combine)


def reference_mlp_experts(experts):
    """Per-expert float64 MLPs (fc1 -> GELU -> fc2) from a BatchedMlp's stacked weights."""

    def make(i):
        def mlp(slots):
            h = slots @ experts.fc1_weight[i].double() + experts.fc1_bias[i].double()
            h = torch.nn.functional.gelu(h)
            return h @ experts.fc2_weight[i].double() + experts.fc2_bias[i].double()

        return mlp

    return [make(i) for i in range(experts.num_experts)]
