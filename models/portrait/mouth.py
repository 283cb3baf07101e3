"""The mouth interior, drawn where the warped lips part: cavity, tongue and teeth.

A warp can only stretch the thin seam between the lips, which smears; so wherever the
deformed inner-lip contour opens we paint the inside of a mouth instead. The contour is
rasterised per frame in torch over a small box: the upper and lower inner lips are each
a curve y(x), so a pixel is inside when it lies below one and above the other (this
holds for the small head rolls the rig makes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .landmarks import CHEEK_LEFT, CHEEK_RIGHT, UPPER_INNER_LIP, FaceFrame

CAVITY_RGB = (95.0, 38.0, 40.0)
TONGUE_RGB = (140.0, 58.0, 62.0)
TEETH_RGB = (238.0, 232.0, 220.0)
UPPER_TEETH = 0.055  # visible height of the upper incisors, in face heights
LOWER_TEETH = 0.032
OPEN_RAMP = 0.012  # face heights of extra opening over which the interior fades in
TEETH_ACROSS = 4.0  # teeth per half arch that show in a wide-open mouth
LIP_POINTS = len(UPPER_INNER_LIP)  # points per inner lip contour, upper and lower alike


@dataclass(frozen=True)
class MouthStyle:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in output pixels
    light: float  # scales the interior to the photo's exposure
    upper_teeth: float  # pixels
    lower_teeth: float
    ramp: float  # pixels
    edge: float  # pixels of anti-aliasing

    @classmethod
    def of(
        cls,
        image: np.ndarray,
        landmarks: np.ndarray,
        lip_reach: np.ndarray,
        within: tuple[int, int, int, int],
    ) -> MouthStyle:
        """`lip_reach` (P, 2): every place the inner lips can reach; `within`: the
        box the mouth box must stay inside."""
        size = image.shape[0]
        frame = FaceFrame.of(landmarks)
        x0, y0 = np.maximum(np.floor(lip_reach.min(axis=0)).astype(int) - 2, within[:2])
        x1, y1 = np.minimum(np.ceil(lip_reach.max(axis=0)).astype(int) + 2, within[2:])
        return cls(
            box=(int(x0), int(y0), int(x1), int(y1)),
            light=_skin_light(image, landmarks),
            upper_teeth=UPPER_TEETH * frame.height,
            lower_teeth=LOWER_TEETH * frame.height,
            ramp=OPEN_RAMP * frame.height,
            edge=max(1.0, size / 512),
        )


def _skin_light(image: np.ndarray, landmarks: np.ndarray) -> float:
    """Cheek brightness relative to a well-lit face, so teeth never outshine the skin."""
    cheeks = []
    for index in (CHEEK_RIGHT, CHEEK_LEFT):
        # Halfway from the cheek edge to the nose tip (landmark 4) is reliably skin.
        x, y = ((landmarks[index] + landmarks[4]) / 2).astype(int)
        r = max(2, image.shape[0] // 100)
        cheeks.append(image[max(y - r, 0) : y + r, max(x - r, 0) : x + r].reshape(-1, 3))
    luma = np.concatenate(cheeks).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(np.clip(luma.mean() / 170.0, 0.45, 1.0))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) per frame: x (W,), xp and fp (N, LIP_POINTS), xp ascending."""
    xq = x.expand(xp.shape[0], -1)
    # searchsorted(xp, xq) is the count of knots below each x; counted directly (a float
    # sum of at most M ones, exact) because ONNX has no searchsorted.
    below = (xp[:, None, :] < xq[:, :, None]).to(xp.dtype).sum(dim=2)
    hi = below.clamp(1, LIP_POINTS - 1).long()
    lo = hi - 1
    x0, x1 = xp.gather(1, lo), xp.gather(1, hi)
    f0, f1 = fp.gather(1, lo), fp.gather(1, hi)
    t = ((xq - x0) / (x1 - x0).clamp_min(1e-3)).clamp(0, 1)
    return f0 + t * (f1 - f0)


def lip_curves(lips: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper and lower inner-lip y at columns xs: lips (N, 2, M, 2) -> two (N, W)."""
    curves = []
    for contour in (lips[:, 0], lips[:, 1]):
        # topk with a constant k sorts like sort(), but exports with a constant K,
        # which TensorRT requires.
        x, order = contour[..., 0].topk(LIP_POINTS, dim=1, largest=False, sorted=True)
        curves.append(_interp(xs, x, contour[..., 1].gather(1, order)))
    return curves[0], curves[1]


def max_gap(lips: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    upper, lower = lip_curves(lips, xs)
    return (lower - upper).amax(dim=1)


def _smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _band(distance: torch.Tensor, edge: float) -> torch.Tensor:
    """1 well inside (distance > 0), 0 outside, anti-aliased over `edge` pixels."""
    return (distance / edge + 0.5).clamp(0, 1)


def composite(
    region: torch.Tensor,
    lips: torch.Tensor,
    tongue_tip: torch.Tensor,
    rest_gap: float,
    style: MouthStyle,
) -> torch.Tensor:
    """The mouth box of the warped frames, region (N, 3, H, W, values 0-255) over
    `style.box`, with the mouth interior painted in. A new tensor rather than a write
    into the frames: an exported graph keeps only what a function returns.

    lips: (N, 2, M, 2) deformed inner lip contours in output pixels.
    """
    x0, y0, x1, y1 = style.box
    dtype, device = region.dtype, region.device
    xs = torch.arange(x0, x1, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(y0, y1, device=device, dtype=torch.float32) + 0.5
    upper, lower = lip_curves(lips.float(), xs)  # (N, W)
    gap = (lower - upper).clamp_min(0)
    opened = ((gap.amax(dim=1) - rest_gap) / style.ramp).clamp(0, 1)  # (N,)

    y = ys[None, :, None]  # (1, H, 1)
    top, bottom = upper[:, None, :], lower[:, None, :]
    below_upper, above_lower = y - top, bottom - y  # (N, H, W)
    # Share of each pixel's (edge-wide) row span that lies between the lips.
    half = style.edge / 2
    covered = torch.minimum(y + half, bottom) - torch.maximum(y - half, top)
    inside = (covered / style.edge).clamp(0, 1)
    alpha = inside * opened[:, None, None]

    # Position inside the opening: s down from the upper lip, q across from the middle.
    corners = lips[:, 0, :, 0].float()
    left, right = corners.amin(dim=1, keepdim=True), corners.amax(dim=1, keepdim=True)
    q = ((xs - (left + right) / 2) / ((right - left) / 2).clamp_min(1.0)).clamp(-1, 1)
    q = q[:, None, :]  # (N, 1, W)
    s = (below_upper / gap[:, None, :].clamp_min(1e-3)).clamp(0, 1)
    colour = _interior(s, q, gap[:, None, :], below_upper, above_lower, tongue_tip, style)

    a = alpha[:, None].to(dtype)
    return region * (1 - a) + colour.to(dtype) * a


def _interior(
    s: torch.Tensor,
    q: torch.Tensor,
    gap: torch.Tensor,
    below_upper: torch.Tensor,
    above_lower: torch.Tensor,
    tongue_tip: torch.Tensor,
    style: MouthStyle,
) -> torch.Tensor:
    """(N, 3, H, W) colours: shaded cavity, tongue, then the two rows of teeth."""
    device = s.device

    def rgb(value: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(value, device=device).view(1, 3, 1, 1) * style.light

    across = 1 - q * q  # 1 mid-mouth, 0 at the corners
    # The cavity is darkest deep in the middle, lighter toward the lips and corners.
    depth = across * (1 - (2 * s - 1).abs())
    colour = rgb(CAVITY_RGB) * (1 - 0.75 * depth)[:, None]

    # The tongue's top is a dome; tongue_tip lifts it toward the upper teeth.
    top = 0.7 - 0.45 * tongue_tip[:, None, None] + 0.25 * q * q
    tongue = _band((s - top) * gap, style.edge) * (0.55 + 0.45 * across)
    shade = 0.6 + 0.4 * ((s - top) * 3).clamp(0, 1)
    colour = torch.lerp(colour, rgb(TONGUE_RGB) * shade[:, None], tongue[:, None])

    # Teeth hang from the lips; with a small opening they fill it, so their visible
    # height is capped by a share of the gap. They sit on an arch: toward the corners
    # they look narrower and darker, then turn away into shadow.
    arch_front = _smoothstep(across, 0.1, 0.45)
    upper_h = torch.minimum(gap * 0.5, torch.full_like(gap, style.upper_teeth)) * arch_front
    lower_h = torch.minimum(gap * 0.15, torch.full_like(gap, style.lower_teeth)) * across**2
    arch = torch.asin(q) * (2 / torch.pi) * TEETH_ACROSS
    seams = 1 - 0.1 * torch.exp(-((torch.sin(torch.pi * arch) / 0.08) ** 2))
    teeth_shade = (1 - 0.6 * q * q) * seams
    upper_teeth = _band(upper_h - below_upper, style.edge) * upper_h.clamp(0, 1)
    lit_from_top = 0.8 + 0.2 * (below_upper / upper_h.clamp_min(1.0)).clamp(0, 1)
    upper_rgb = rgb(TEETH_RGB) * (teeth_shade * lit_from_top)[:, None]
    colour = torch.lerp(colour, upper_rgb, upper_teeth[:, None])
    lower_teeth = _band(lower_h - above_lower, style.edge) * lower_h.clamp(0, 1)
    lower_rgb = rgb(TEETH_RGB) * (0.5 * teeth_shade)[:, None]
    colour = torch.lerp(colour, lower_rgb, lower_teeth[:, None])
    return colour
