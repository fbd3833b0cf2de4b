"""Jobs of a grid sweep that train the same run, because the values that tell them apart are settings their options
leave unused: ``-m moe=dense,last_half moe.num_experts=4,8`` trains two identical dense ViTs, which ``collect`` then
lists apart as if ``moe.num_experts`` had mattered. The conf files keep such keys (``conf/moe/dense.yaml`` extends
``last_half.yaml`` so that a sweep over both composes), so they are not refused; the sweep is warned once, before
its jobs start (``sweep_check.duplicate_runs_warning``)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

# moe keys only the sparse routers read (conf/moe/last_half.yaml: "router=soft ignores them")
SPARSE_ROUTER_KEYS = ("k", "capacity_factor", "batch_priority", "noise_std", "aux_loss_weight")
# moe keys that choose where the MoE layers are, which a dense ViT (no MoE layer) still reads
PLACEMENT_KEYS = ("placement", "layers")


def is_dense(moe: Mapping[str, Any]) -> bool:
    """Whether ``moe`` places no MoE layer (``moe=dense``: placement none, no explicit ``layers``)."""
    return moe.get("placement") == "none" and not moe.get("layers")


def unused_moe_keys(moe: Mapping[str, Any]) -> list[str]:
    """The ``moe`` keys that change nothing in the run ``moe`` configures: every key but the placement's for a
    dense ViT (``moe=dense``), the sparse routers' for the soft one."""
    if is_dense(moe):
        return [key for key in moe if key not in PLACEMENT_KEYS]
    if moe.get("router") == "soft":
        return [key for key in SPARSE_ROUTER_KEYS if key in moe]
    return []


def run_identity(config: Mapping[str, Any]) -> str:
    """What makes a run the run it is: its config without the ``moe`` keys it leaves unused."""
    moe = dict(config.get("moe") or {})
    for key in unused_moe_keys(moe):
        moe.pop(key)
    return json.dumps({**config, "moe": moe}, sort_keys=True, default=str)


def duplicate_jobs_warning(jobs: Sequence[Sequence[str]], configs: Sequence[Mapping[str, Any]],
                           fixed: set) -> Optional[str]:
    """The first pair of jobs (their overrides ``jobs``, their plain configs ``configs``) that train the same run,
    in one line naming their swept values and the unused keys that set them apart; None when every job differs."""
    identities = [run_identity(config) for config in configs]
    first_of: dict[str, int] = {}
    for number, identity in enumerate(identities):
        earlier = first_of.setdefault(identity, number)
        if earlier == number:
            continue
        swept = [[override for override in jobs[job] if override not in fixed] for job in (earlier, number)]
        differing = sorted({override.split("=", 1)[0] for override in set(swept[0]) ^ set(swept[1])})
        repeats = len(identities) - len(set(identities))
        return (f"jobs {earlier} ({' '.join(swept[0])}) and {number} ({' '.join(swept[1])}) train the same run: "
                f"{', '.join(differing)} {'is' if len(differing) == 1 else 'are'} unused there "
                f"({_why(configs[number])}); {repeats} of the sweep's {len(identities)} jobs "
                f"{'repeats' if repeats == 1 else 'repeat'} another job's run")
    return None


def _why(config: Mapping[str, Any]) -> str:
    """Named by the keys, not by an option: ``routing=dense`` places no MoE layer as ``moe=dense`` does."""
    if is_dense(config.get("moe") or {}):
        return "moe.placement=none: a dense ViT, no MoE layer"
    return "moe.router=soft reads none of the sparse routers' keys"
