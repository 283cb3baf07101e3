"""Trilinear sampling of a 3-D volume written as gathers, for graphs that must leave PyTorch.

Ditto's warping network samples its [N, C, 16, 64, 64] feature volume with a 5-D
`F.grid_sample` (trilinear, zero padding, align_corners=False). ONNX exports that as a
5-D GridSample, which onnxruntime does not run and TensorRT runs only through a custom
plugin. `grid_sample_3d` computes the same values from plain ops: index arithmetic, one
row gather (ONNX Gather) per corner of the cell, and a weighted sum.
"""

from __future__ import annotations

import torch


def _source_index(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised coordinates in [-1, 1] to voxel coordinates, as `F.grid_sample` maps
    them with align_corners=False: -1 and 1 are the outer edges of the first and last
    voxels, so voxel centres sit at 0, 1, ..., size - 1."""
    return ((coord + 1) * size - 1) / 2


def _neighbours(
    coord: torch.Tensor, size: int, stride: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Along one axis, the two voxels around each normalised coordinate, as (row offset
    = clamped index * stride, interpolation weight, zero where the voxel is outside)."""
    x = _source_index(coord, size)
    lower = torch.floor(x)
    pairs = []
    for index, weight in ((lower, lower + 1 - x), (lower + 1, x - lower)):
        inside = (index >= 0) & (index <= size - 1)  # false for NaN too
        # Outside voxels read row 0 and weigh it zero.
        offset = torch.where(inside, index, torch.zeros_like(index)).long() * stride
        pairs.append((offset, weight * inside.to(coord.dtype)))
    return pairs[0], pairs[1]


def grid_sample_3d(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros",
    align_corners=False)` for 5-D inputs, from gathers.

    volume: [N, C, D, H, W]. grid: [N, Do, Ho, Wo, 3], the last axis (x, y, z) in
    [-1, 1] across (W, H, D); corners outside the volume count as zeros. Returns
    [N, C, Do, Ho, Wo]. Sums the corners in F.grid_sample's order with its weights,
    so on CPU the two agree to the last bit. (A NaN coordinate gives NaN here, where
    F.grid_sample gives zero.)
    """
    n, c, d, h, w = volume.shape
    out_shape = grid.shape[1:4]
    # Rows of one flat [N * D * H * W, C] table: a corner is one row, read by index.
    table = volume.permute(0, 2, 3, 4, 1).reshape(n * d * h * w, c)
    batch = (torch.arange(n, device=grid.device) * (d * h * w)).view(n, 1, 1, 1)
    xs = _neighbours(grid[..., 0], w, 1)
    ys = _neighbours(grid[..., 1], h, w)
    zs = _neighbours(grid[..., 2], d, h * w)

    out: torch.Tensor | None = None
    for z_offset, z_weight in zs:
        z_row = batch + z_offset
        for y_offset, y_weight in ys:
            for x_offset, x_weight in xs:
                row = z_row + y_offset + x_offset
                weight = x_weight * y_weight * z_weight
                values = torch.index_select(table, 0, row.reshape(-1))
                term = values * weight.reshape(-1, 1)
                out = term if out is None else out + term
    assert out is not None
    return out.view(n, *out_shape, c).permute(0, 4, 1, 2, 3)
