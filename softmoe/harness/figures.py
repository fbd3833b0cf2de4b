"""The dispatch-map figure, drawn one way for W&B (``val/dispatch_maps``) and for the notebooks.

    fig = plot_dispatch_maps(images[:4], records, model)   # records: softmoe.capture_routing's, of that pass
    rgb = render(fig)                                      # [H, W, 3] uint8, what W&B receives

A slot's input is a weighted average of the tokens: its column of the dispatch weights, a softmax over the m
tokens (paper Eq. 1). Each map shows one slot's weights over the patch grid (class and register tokens left
out), all maps of a figure on one colour scale whose colorbar marks the uniform weight 1/m.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from softmoe import block_index
from softmoe.capture import RoutingRecord

COLORMAP = "inferno"


def plot_dispatch_maps(
    images: torch.Tensor,
    records: Mapping[str, RoutingRecord],
    model: nn.Module,
    *,
    num_slots: int = 8,
    image_titles: Optional[Sequence[str]] = None,
):
    """A matplotlib ``Figure``: a row per MoE layer and image (``images`` [k, C, H, W], the first k of the pass that
    filled ``records``), the image then the dispatch weights of ``num_slots`` slots spread over all n·p."""
    from matplotlib.figure import Figure

    grid_h, grid_w = model.patch_embed.grid_size
    prefix = model.num_prefix_tokens  # class/register tokens come before the patches
    names = sorted(records, key=block_index)
    shown = len(images)
    rows = [(name, index) for name in names for index in range(shown)]
    slots = {}  # layer -> the slots shown
    for name in names:
        n, p = records[name].dispatch.shape[2:]
        slots[name] = np.linspace(0, n * p - 1, min(num_slots, n * p)).round().astype(int)
    columns = 1 + max(len(chosen) for chosen in slots.values())
    maps = {  # (layer, image) -> [patches, slots shown]
        (name, index): records[name].dispatch[index].detach().float().cpu().flatten(1)[prefix:, slots[name]]
        for name, index in rows
    }
    vmax = max(weights.max().item() for weights in maps.values())  # one colour scale for the whole figure
    tokens = records[names[0]].dispatch.shape[1]  # m

    fig = Figure(figsize=(1.3 * columns + 1.4, 1.4 * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    mappable = None
    for row, (name, index) in enumerate(rows):
        _show_image(axes[row, 0], images[index])
        title = image_titles[index] if image_titles is not None else f"image {index}"
        axes[row, 0].set_title(f"{name}\n{title}" if len(names) > 1 else title, fontsize=7)
        n, p = records[name].dispatch.shape[2:]
        for column, ax in enumerate(axes[row, 1:]):
            ax.axis("off")
            if column >= len(slots[name]):
                continue
            slot = slots[name][column]
            weights = maps[(name, index)][:, column].reshape(grid_h, grid_w).numpy()
            mappable = ax.imshow(weights, cmap=COLORMAP, vmin=0, vmax=vmax)
            if row == 0 or rows[row - 1][0] != name:
                ax.set_title(f"e{slot // p} s{slot % p}", fontsize=8)
    bar = fig.colorbar(mappable, ax=axes[:, 1:], fraction=0.05, label="dispatch weight")
    bar.ax.axhline(1 / tokens, color="white", linewidth=1.5)  # a slot reading all m tokens equally gives each 1/m
    uniform = f"uniform 1/m = 1/{tokens}"
    bar.ax.text(1.6, 1 / tokens, uniform, transform=bar.ax.get_yaxis_transform(), fontsize=7, va="center")
    layers = ", ".join(names)
    title = f"{layers}: dispatch weights of slots e<expert> s<slot> over the {grid_h}x{grid_w} patches"
    fig.suptitle(title, fontsize=9)
    return fig


def _show_image(ax, image: torch.Tensor) -> None:
    pixels = image.detach().float().cpu().permute(1, 2, 0)  # [H, W, C]
    pixels = ((pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-12)).numpy()
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray")
    ax.axis("off")


def render(fig) -> np.ndarray:
    """A figure as an RGB image [H, W, 3] uint8 (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
