"""Bilinear grid sampling from standard operators, for runtimes without a GridSample op.

:func:`portable_grid_sample` has the signature of :data:`stn_deploy.model.GridSampler` and
reproduces ``F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=...)``
with ops every ONNX runtime has (Floor, Clip, Cast, Mul, Add, GatherElements, Where): it
computes the four neighbours of each sampling point, gathers them from the flattened image,
and zeroes the neighbours that fall outside it (zeros padding). Exported through the dynamo
exporter it yields a graph with no GridSample and no AffineGrid node.

:func:`portable_grid_sampler_decomposition` is the same function in the form of an
``aten.grid_sampler`` decomposition, used to rewrite a user's ``torch.export`` archive (.pt2)
whose grid_sample call we cannot swap at the module level.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _unnormalize(coord: Tensor, size: int, align_corners: bool) -> Tensor:
    """Grid coordinates in [-1, 1] → pixel coordinates (PyTorch's ``grid_sampler_unnormalize``)."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def portable_grid_sample(x: Tensor, grid: Tensor, align_corners: bool) -> Tensor:
    """Bilinear sampling with zeros padding from gathers: ``x`` [N,C,H,W], ``grid`` [N,Ho,Wo,2]."""
    n, c, h, w = x.shape
    ho, wo = grid.shape[1], grid.shape[2]
    ix = _unnormalize(grid[..., 0], w, align_corners)  # [N, Ho, Wo], x → width
    iy = _unnormalize(grid[..., 1], h, align_corners)
    x0 = torch.floor(ix)
    y0 = torch.floor(iy)
    wx1 = ix - x0
    wy1 = iy - y0
    wx0 = 1 - wx1
    wy0 = 1 - wy1
    flat = x.reshape(n, c, h * w)
    out: Tensor | None = None
    for dx, dy, weight in ((0, 0, wx0 * wy0), (1, 0, wx1 * wy0), (0, 1, wx0 * wy1), (1, 1, wx1 * wy1)):
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        # Clamp before the integer cast so far-away points cannot overflow the index.
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).to(torch.int64).reshape(n, 1, ho * wo)
        values = torch.gather(flat, 2, index.expand(n, c, ho * wo))
        weight = torch.where(inside, weight, torch.zeros_like(weight)).reshape(n, 1, ho * wo)
        term = values * weight
        out = term if out is None else out + term
    return out.reshape(n, c, ho, wo)


def portable_grid_sampler_decomposition(
    x: Tensor, grid: Tensor, interpolation_mode: int, padding_mode: int, align_corners: bool
) -> Tensor:
    """``aten.grid_sampler`` → :func:`portable_grid_sample` (bilinear, zeros padding only)."""
    # aten encodes interpolation 0=bilinear, 1=nearest, 2=bicubic; padding 0=zeros, 1=border, 2=reflection.
    if interpolation_mode != 0 or padding_mode != 0:
        raise NotImplementedError(
            "the portable target decomposes grid_sample with mode='bilinear', padding_mode='zeros' only "
            f"(this model uses interpolation_mode={interpolation_mode}, padding_mode={padding_mode})"
        )
    if x.dim() != 4:
        raise NotImplementedError("the portable target decomposes 2-D (4-D input) grid_sample only")
    return portable_grid_sample(x, grid, align_corners)
