"""Matplotlib plots of attention maps. Each function builds and returns a ``matplotlib.figure.Figure``.

Figures are made without ``pyplot`` (no global state, nothing to close, works headless with Agg):
save one with ``fig.savefig(path)``; in a notebook, a returned figure displays itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["plot_attention", "plot_heads", "plot_patch_overlay"]


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _matrix(weights, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(weights, np.float32)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {name}.shape={a.shape}.")
    return a


def _draw(ax, a, x_labels, y_labels, cmap, vmax=None):
    image = ax.imshow(a, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    for labels, set_ticks, set_labels, size, rotation in (
        (x_labels, ax.set_xticks, ax.set_xticklabels, a.shape[1], 90),
        (y_labels, ax.set_yticks, ax.set_yticklabels, a.shape[0], 0),
    ):
        if labels is None:
            continue
        if len(labels) != size:
            raise ValueError(f"got {len(labels)} labels for an axis of {size} tokens.")
        set_ticks(range(size))
        set_labels([str(x) for x in labels], rotation=rotation, fontsize=8 if size <= 32 else 6)
    return image


def plot_attention(
    weights,
    *,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    figsize: tuple[float, float] | None = None,
):
    """A heatmap of one ``[T, S]`` attention map: rows are queries (``y_labels``), columns keys (``x_labels``).

    >>> import numpy as np
    >>> fig = plot_attention(np.eye(3), x_labels=list("abc"), y_labels=list("abc"), title="identity")
    >>> fig.axes[0].get_title()
    'identity'
    """
    a = _matrix(weights, "weights", 2)
    side = min(10.0, 2.0 + 0.3 * max(a.shape))
    fig = _figure(figsize or (side * 1.15, side))
    ax = fig.add_subplot()
    image = _draw(ax, a, x_labels, y_labels, cmap)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def plot_heads(
    weights,
    *,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    title: str | None = None,
    ncols: int | None = None,
    cmap: str = "viridis",
):
    """A grid of the ``N`` heads of one layer, ``weights [N, T, S]``, on a shared colour scale.

    >>> import numpy as np
    >>> fig = plot_heads(np.full((3, 4, 4), 0.25), title="layer 0")
    >>> len([ax for ax in fig.axes if ax.get_title().startswith("head")])
    3
    """
    a = _matrix(weights, "weights", 3)
    heads = a.shape[0]
    ncols = ncols or min(heads, 4)
    nrows = math.ceil(heads / ncols)
    size = 1.5 + 0.12 * max(a.shape[1:])
    fig = _figure((size * ncols + 1.0, size * nrows + (0.4 if title else 0.0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    vmax = float(a.max()) if a.size else 1.0
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= heads:
            ax.set_axis_off()
            continue
        bottom, left = i + ncols >= heads, i % ncols == 0  # tick labels on the outer edges only
        image = _draw(ax, a[i], x_labels if bottom else None, y_labels if left else None, cmap, vmax=vmax)
        ax.set_title(f"head {i}", fontsize=9)
        if x_labels is None or not bottom:
            ax.set_xticks([])
        if y_labels is None or not left:
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return fig


def _patch_grid(patch_map: np.ndarray, image_shape) -> np.ndarray:
    """A flat ``[P]`` map becomes ``[gh, gw]`` with the image's aspect ratio (square patches)."""
    if patch_map.ndim == 2:
        return patch_map
    p = patch_map.shape[0]
    h, w = image_shape[:2]
    gh = round(math.sqrt(p * h / w))
    if gh == 0 or p % gh:
        raise ValueError(f"cannot arrange {p} patches on a grid for an image of shape {tuple(image_shape)}; "
                         "pass the map as [gh, gw].")
    return patch_map.reshape(gh, p // gh)


def plot_patch_overlay(
    images,
    patch_maps,
    *,
    titles: Sequence[str] | None = None,
    alpha: float = 0.6,
    cmap: str | None = None,
    image_cmap: str = "gray",
    interpolation: str = "nearest",
    signed: bool = False,
):
    """Images with a per-patch map (e.g. rollout from the class token) drawn over them.

    Args:
      images: ``[B, H, W]`` (grey) or ``[B, H, W, C]`` (for one image, add a leading axis).
      patch_maps: one map per image, ``[B, P]`` patches in row-major order or ``[B, gh, gw]``; each
        is scaled to ``[0, 1]`` (min to max) and stretched over its image.
      titles: one per image.
      interpolation: how the patch map is stretched (``"nearest"`` shows the patches, ``"bilinear"`` smooths).
      signed: for maps whose sign means something (CDAM: evidence for or against a class): scale each by its
        largest magnitude to ``[-1, 1]`` so zero stays zero, drawn with a diverging colour map.
      cmap: the overlay's colour map (default ``"jet"``, or ``"bwr"`` when ``signed``).

    One column per image: the image above, the overlay below.

    >>> import numpy as np
    >>> fig = plot_patch_overlay(np.zeros((2, 8, 8)), np.arange(32.0).reshape(2, 16), titles=["a", "b"])
    >>> len(fig.axes)
    4
    """
    images = np.asarray(images, np.float32)
    maps = np.asarray(patch_maps, np.float32)
    if images.ndim not in (3, 4) or maps.ndim not in (2, 3):
        raise ValueError(f"images must be [B, H, W(, C)] and patch_maps [B, P] or [B, gh, gw], got {images.shape} "
                         f"and {maps.shape}.")
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"need one patch map per image, got {maps.shape[0]} maps for {images.shape[0]} images.")
    if titles is not None and len(titles) != images.shape[0]:
        raise ValueError(f"got {len(titles)} titles for {images.shape[0]} images.")
    count = images.shape[0]
    fig = _figure((2.0 * count + 0.5, 4.2))
    axes = fig.subplots(2, count, squeeze=False)
    for i in range(count):
        image = images[i]
        grid = _patch_grid(maps[i], image.shape)
        if signed:
            peak = np.abs(grid).max()
            grid, limits = (grid / peak if peak > 0 else np.zeros_like(grid)), (-1.0, 1.0)
        else:
            span = grid.max() - grid.min()
            grid, limits = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid), (0.0, 1.0)
        h, w = image.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        axes[0, i].imshow(image, cmap=image_cmap if image.ndim == 2 else None, extent=extent)
        axes[1, i].imshow(image, cmap=image_cmap if image.ndim == 2 else None, extent=extent)
        overlay_cmap = cmap or ("bwr" if signed else "jet")
        axes[1, i].imshow(grid, cmap=overlay_cmap, alpha=alpha, extent=extent, interpolation=interpolation,
                          vmin=limits[0], vmax=limits[1])
        if titles is not None:
            axes[0, i].set_title(str(titles[i]), fontsize=9)
        for ax in axes[:, i]:
            ax.set_axis_off()
    return fig
