"""3-D Gaussian Splatting rasterization for the GaussianTalker backend.

Two rasterizers with one signature and one set of conventions:

- ``rasterize_gsplat``: ``gsplat.rasterization`` (optional extra, CUDA only, imported lazily).
- ``rasterize_reference``: a small pure-torch rasterizer, exact and deterministic, for CPU,
  tests and checking gsplat. Slow (tiles in a Python loop), fine for a few hundred Gaussians.

``rasterize(..., device=...)`` picks gsplat when the device is CUDA and gsplat imports, and
the reference otherwise.

Conventions (those of upstream's rasterizer, KU-CVLAB/GaussianTalker's fork of
diff-gaussian-rasterization, expressed the way gsplat takes a camera):

- ``Camera.viewmat`` is world-to-camera, OpenCV axes (x right, y down, z forward);
  ``Camera.K`` is pinhole intrinsics. Pixel (row i, column j) has its centre at
  (j + 0.5, i + 0.5), as in gsplat. Upstream puts pixel centres at integers and its
  principal point at (W - 1) / 2, which is the same image as cx = W / 2 here.
- Gaussians: means [N, 3] (world), quats [N, 4] wxyz (normalised here), scales [N, 3]
  already activated (exp), opacities [N] already activated (sigmoid), colors [N, D]
  already evaluated (see ``sh_to_rgb``).
- Projection: EWA with the projection Jacobian, its x/z, y/z clamped to 1.3 times the
  half field of view, and 0.3 px² added to the 2-D covariance diagonal (no opacity
  compensation: "classic"). Gaussians at depth z <= ``near_plane`` (0.2, upstream's
  hard-coded cull) are dropped.
- Per pixel, front to back by view depth: alpha = min(alpha_max, o·exp(-½dᵀΣ⁻¹d)),
  skipped below 1/255; a Gaussian that would bring the transmittance below 1e-4 ends the
  pixel (not included). Out: C + T·background, alpha = 1 - T.

Where gsplat differs and cannot be told otherwise: its alpha clamp is 0.999 (upstream
and the reference default: 0.99) and it stops at T <= 1e-4 rather than T < 1e-4. Both
matter only where a single Gaussian is nearly opaque at a pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from farm.errors import InvalidInput, MissingDependency

__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "EPS2D",
    "NEAR_PLANE",
    "SH_C0",
    "Camera",
    "colors_from_sh",
    "gsplat_available",
    "quat_to_rotmat",
    "rasterize",
    "rasterize_gsplat",
    "rasterize_reference",
    "sh_to_rgb",
]

ALPHA_MIN = 1.0 / 255.0  # contributions below this are skipped
ALPHA_MAX = 0.99  # upstream's clamp on a single Gaussian's alpha
T_MIN = 1e-4  # a pixel is done once its transmittance would fall below this
EPS2D = 0.3  # low-pass dilation of the 2-D covariance, px²
NEAR_PLANE = 0.2  # upstream's rasterizer culls view depth <= 0.2
FOV_CLAMP = 1.3  # the Jacobian is evaluated at x/z, y/z clamped to 1.3 x tan(half fov)

# Real spherical harmonics constants as 3DGS uses them (degree 0 to 3).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (
    1.0925484305920792,
    -1.0925484305920792,
    0.31539156525252005,
    -1.0925484305920792,
    0.5462742152960396,
)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)

_TILE = 32  # reference rasterizer tile size, pixels


def _as_tensor(x, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.numel() != math.prod(shape):
        raise InvalidInput(f"camera {name} must have {math.prod(shape)} values, got {t.numel()}")
    return t.reshape(shape)


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera as gsplat takes it.

    viewmat: [4, 4] world-to-camera, OpenCV axes (x right, y down, z forward).
    K: [3, 3] intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]; pixel centres at +0.5.
    Both are stored as float64 CPU tensors; the rasterizers cast them as they need.
    """

    viewmat: torch.Tensor
    K: torch.Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "viewmat", _as_tensor(self.viewmat, "viewmat", (4, 4)))
        object.__setattr__(self, "K", _as_tensor(self.K, "K", (3, 3)))
        width, height = int(self.width), int(self.height)
        if width <= 0 or height <= 0:
            raise InvalidInput(f"camera size must be positive, got {width}x{height}")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        if not torch.isfinite(self.viewmat).all() or not torch.isfinite(self.K).all():
            raise InvalidInput("camera viewmat and K must be finite")
        if self.K[0, 0] <= 0 or self.K[1, 1] <= 0:
            raise InvalidInput("camera focal lengths must be positive")

    @classmethod
    def from_fov(cls, R, T, fovx: float, fovy: float, width: int, height: int) -> Camera:
        """The camera upstream's ``scene/cameras.py`` builds from a frame's (R, T, FoVx, FoVy).

        R [3, 3] is what upstream stores as ``Camera.R``: the *transpose* of the
        world-to-camera rotation (camera-to-world rotation); T [3] (or [1, 3]) is the
        world-to-camera translation. Upstream's ``getWorld2View2`` puts Rᵀ and T in a 4x4
        (then transposes the whole for its row-vector GLSL layout, which gsplat does not
        want). The principal point is the image centre (upstream's projection matrix has
        no offset) and the focal lengths come from the fields of view (radians):
        f = size / (2·tan(fov / 2)).
        """
        rot = _as_tensor(R, "R", (3, 3))
        trans = _as_tensor(T, "T", (3,))
        viewmat = torch.eye(4, dtype=torch.float64)
        viewmat[:3, :3] = rot.T
        viewmat[:3, 3] = trans
        fx = width / (2.0 * math.tan(float(fovx) / 2.0))
        fy = height / (2.0 * math.tan(float(fovy) / 2.0))
        K = torch.tensor(
            [[fx, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]],
            dtype=torch.float64,
        )
        return cls(viewmat=viewmat, K=K, width=width, height=height)

    @property
    def rotation(self) -> torch.Tensor:
        """World-to-camera rotation [3, 3]."""
        return self.viewmat[:3, :3]

    @property
    def translation(self) -> torch.Tensor:
        """World-to-camera translation [3]."""
        return self.viewmat[:3, 3]

    @property
    def center(self) -> torch.Tensor:
        """Camera centre in world coordinates [3] (upstream's ``camera_center``)."""
        return -self.rotation.T @ self.translation

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points [N, 3] to pixel coordinates [N, 2] (continuous, centres at +0.5)."""
        p = points.to(torch.float64) @ self.rotation.T + self.translation
        uv = p[:, :2] / p[:, 2:3]
        return uv * torch.stack([self.K[0, 0], self.K[1, 1]]) + self.K[:2, 2]


def sh_to_rgb(sh: torch.Tensor, dirs: torch.Tensor, degree: int | None = None) -> torch.Tensor:
    """Evaluate view-dependent colour from SH coefficients, as 3DGS does.

    sh: [N, K, C] with K = (degree + 1)² coefficients (1, 4, 9 or 16), coefficient-major as
    in the PLY (f_dc then f_rest). dirs: [N, 3] view directions, Gaussian centre minus
    camera centre; normalised here. degree: use only the first bands (upstream's
    ``active_sh_degree``); default: all that K holds. Returns max(SH(dirs) + 0.5, 0), [N, C].
    """
    if sh.dim() != 3:
        raise InvalidInput(f"sh must be [N, K, C], got shape {tuple(sh.shape)}")
    k = sh.shape[1]
    full = math.isqrt(k) - 1
    if (full + 1) ** 2 != k or full > 3:
        raise InvalidInput(f"sh must hold 1, 4, 9 or 16 coefficients, got {k}")
    deg = full if degree is None else int(degree)
    if not 0 <= deg <= full:
        raise InvalidInput(f"SH degree {deg} needs {(deg + 1) ** 2} coefficients, got {k}")
    if dirs.shape != (sh.shape[0], 3):
        raise InvalidInput(f"dirs must be [{sh.shape[0]}, 3], got shape {tuple(dirs.shape)}")

    result = SH_C0 * sh[:, 0]
    if deg > 0:
        d = dirs.to(sh.dtype)
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        x, y, z = d[:, 0:1], d[:, 1:2], d[:, 2:3]
        result = result + SH_C1 * (-y * sh[:, 1] + z * sh[:, 2] - x * sh[:, 3])
        if deg > 1:
            xx, yy, zz = x * x, y * y, z * z
            xy, yz, xz = x * y, y * z, x * z
            result = (
                result
                + SH_C2[0] * xy * sh[:, 4]
                + SH_C2[1] * yz * sh[:, 5]
                + SH_C2[2] * (2.0 * zz - xx - yy) * sh[:, 6]
                + SH_C2[3] * xz * sh[:, 7]
                + SH_C2[4] * (xx - yy) * sh[:, 8]
            )
            if deg > 2:
                result = (
                    result
                    + SH_C3[0] * y * (3.0 * xx - yy) * sh[:, 9]
                    + SH_C3[1] * xy * z * sh[:, 10]
                    + SH_C3[2] * y * (4.0 * zz - xx - yy) * sh[:, 11]
                    + SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy) * sh[:, 12]
                    + SH_C3[4] * x * (4.0 * zz - xx - yy) * sh[:, 13]
                    + SH_C3[5] * z * (xx - yy) * sh[:, 14]
                    + SH_C3[6] * x * (xx - 3.0 * yy) * sh[:, 15]
                )
    return torch.clamp_min(result + 0.5, 0.0)


def colors_from_sh(
    means: torch.Tensor, sh: torch.Tensor, camera: Camera, degree: int | None = None
) -> torch.Tensor:
    """Per-Gaussian colours [N, C] seen from ``camera``: SH at (mean - camera centre)."""
    center = camera.center.to(device=means.device, dtype=means.dtype)
    return sh_to_rgb(sh, means - center, degree)


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Quaternions [N, 4] (w, x, y, z; normalised here) to rotation matrices [N, 3, 3]."""
    q = torch.nn.functional.normalize(quats, dim=-1)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z),
        2 * (x * y - w * z),
        2 * (x * z + w * y),
        2 * (x * y + w * z),
        1 - 2 * (x * x + z * z),
        2 * (y * z - w * x),
        2 * (x * z - w * y),
        2 * (y * z + w * x),
        1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def _check_inputs(means, quats, scales, opacities, colors, background, camera):
    n = means.shape[0] if means.dim() == 2 else -1
    if means.dim() != 2 or means.shape[1] != 3:
        raise InvalidInput(f"means must be [N, 3], got {tuple(means.shape)}")
    if quats.shape != (n, 4):
        raise InvalidInput(f"quats must be [{n}, 4], got {tuple(quats.shape)}")
    if scales.shape != (n, 3):
        raise InvalidInput(f"scales must be [{n}, 3], got {tuple(scales.shape)}")
    if opacities.shape != (n,):
        raise InvalidInput(f"opacities must be [{n}], got {tuple(opacities.shape)}")
    if colors.dim() != 2 or colors.shape[0] != n:
        raise InvalidInput(f"colors must be [{n}, D], got {tuple(colors.shape)}")
    d = colors.shape[1]
    hw = (camera.height, camera.width, d)
    if tuple(background.shape) not in ((d,), hw):
        raise InvalidInput(f"background must be [{d}] or {list(hw)}, got {tuple(background.shape)}")


def _project(means, quats, scales, camera: Camera, near_plane: float, eps2d: float):
    """Screen-space Gaussians: centres [N, 2], conics (a, b, c) [N, 3], 2-D cov diag [N, 2],
    depths [N] and a validity mask [N]."""
    dtype = means.dtype
    rot_w = camera.rotation.to(dtype)
    t_w = camera.translation.to(dtype)
    fx, fy = float(camera.K[0, 0]), float(camera.K[1, 1])
    cx, cy = float(camera.K[0, 2]), float(camera.K[1, 2])
    w, h = camera.width, camera.height

    p = means @ rot_w.T + t_w  # [N, 3] camera space
    z = p[:, 2]
    valid = z > near_plane
    zs = torch.where(valid, z, torch.ones_like(z))  # keep the arithmetic finite for culled ones

    m = quat_to_rotmat(quats.to(dtype)) * scales.to(dtype)[:, None, :]  # R·S
    cov_w = m @ m.transpose(1, 2)
    cov_c = rot_w @ cov_w @ rot_w.T

    # Jacobian of the perspective projection at the centre, with x/z and y/z clamped to a
    # margin around the field of view (as upstream and gsplat do).
    tan_x, tan_y = 0.5 * w / fx, 0.5 * h / fy
    tx = (p[:, 0] / zs).clamp(-(cx / fx + 0.3 * tan_x), (w - cx) / fx + 0.3 * tan_x)
    ty = (p[:, 1] / zs).clamp(-(cy / fy + 0.3 * tan_y), (h - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(zs)
    jac = torch.stack(
        [
            torch.stack([fx / zs, zero, -fx * tx / zs], dim=-1),
            torch.stack([zero, fy / zs, -fy * ty / zs], dim=-1),
        ],
        dim=1,
    )  # [N, 2, 3]
    cov2 = jac @ cov_c @ jac.transpose(1, 2)
    a = cov2[:, 0, 0] + eps2d
    b = cov2[:, 0, 1]
    c = cov2[:, 1, 1] + eps2d
    det = a * c - b * b
    valid = valid & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conic = torch.stack([c / det, -b / det, a / det], dim=-1)
    centre = torch.stack([fx * p[:, 0] / zs + cx, fy * p[:, 1] / zs + cy], dim=-1)
    return centre, conic, torch.stack([a, c], dim=-1), z, valid


def rasterize_reference(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    camera: Camera,
    background: torch.Tensor,
    *,
    near_plane: float = NEAR_PLANE,
    eps2d: float = EPS2D,
    alpha_max: float = ALPHA_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch 3DGS rasterizer (see the module docstring for the conventions).

    means [N, 3], quats [N, 4] wxyz, scales [N, 3] (activated), opacities [N] (activated),
    colors [N, D], background [D] or [H, W, D]. Returns (image [H, W, D], alpha [H, W]) in
    the dtype of ``means`` (float32 or float64) on the device of ``means``. Exact up to
    float rounding: a Gaussian is only left out of a tile where its alpha is provably below
    1/255 there. Deterministic.
    """
    _check_inputs(means, quats, scales, opacities, colors, background, camera)
    dtype = means.dtype if means.dtype == torch.float64 else torch.float32
    dev = means.device
    means = means.to(dtype)
    opac = opacities.to(dtype)
    cols = colors.to(dtype)
    bg = background.to(device=dev, dtype=dtype)
    w, h, d = camera.width, camera.height, cols.shape[1]

    centre, conic, diag, depth, valid = _project(means, quats, scales, camera, near_plane, eps2d)
    valid = valid & (opac >= ALPHA_MIN)
    # Beyond the ellipse dᵀΣ⁻¹d = 2·ln(255·o) alpha < 1/255; its bounding box is
    # ±sqrt(2·ln(255·o)·Σ_xx), ±sqrt(2·ln(255·o)·Σ_yy). One pixel of slack for rounding.
    extent = torch.sqrt(2.0 * torch.log((opac * 255.0).clamp_min(1.0)))
    half = extent[:, None] * diag.clamp_min(0).sqrt() + 1.0
    lo, hi = centre - half, centre + half

    idx = torch.nonzero(valid).squeeze(1)
    order = torch.sort(depth[idx], stable=True).indices  # front to back; ties by index
    idx = idx[order]
    centre, conic, lo, hi = centre[idx], conic[idx], lo[idx], hi[idx]
    opac, cols = opac[idx], cols[idx]

    image = torch.zeros(h, w, d, dtype=dtype, device=dev)
    trans = torch.ones(h, w, dtype=dtype, device=dev)
    for y0 in range(0, h, _TILE):
        y1 = min(y0 + _TILE, h)
        rows = (lo[:, 1] <= y1) & (hi[:, 1] >= y0)
        for x0 in range(0, w, _TILE):
            x1 = min(x0 + _TILE, w)
            sel = torch.nonzero(rows & (lo[:, 0] <= x1) & (hi[:, 0] >= x0)).squeeze(1)
            if sel.numel() == 0:
                continue
            py, px = torch.meshgrid(
                torch.arange(y0, y1, dtype=dtype, device=dev) + 0.5,
                torch.arange(x0, x1, dtype=dtype, device=dev) + 0.5,
                indexing="ij",
            )
            dx = centre[sel, 0][None, :] - px.reshape(-1, 1)  # [P, G]
            dy = centre[sel, 1][None, :] - py.reshape(-1, 1)
            ca, cb, cc = conic[sel].unbind(-1)
            sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
            alpha = torch.clamp_max(opac[sel] * torch.exp(-sigma), alpha_max)
            alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, 0.0)
            # A Gaussian that would take T below T_MIN ends the pixel, itself excluded.
            # T is non-increasing, so the kept ones are a prefix in depth order.
            alpha = torch.where(torch.cumprod(1.0 - alpha, dim=1) >= T_MIN, alpha, 0.0)
            t_after = torch.cumprod(1.0 - alpha, dim=1)
            t_before = torch.cat([torch.ones_like(t_after[:, :1]), t_after[:, :-1]], dim=1)
            image[y0:y1, x0:x1] = ((alpha * t_before) @ cols[sel]).reshape(y1 - y0, x1 - x0, d)
            trans[y0:y1, x0:x1] = t_after[:, -1].reshape(y1 - y0, x1 - x0)
    return image + trans[..., None] * bg, 1.0 - trans


def gsplat_available() -> bool:
    """Whether gsplat imports (it needs CUDA to run)."""
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return True


def _import_gsplat():
    try:
        import gsplat
    except ImportError as exc:
        raise MissingDependency(
            "the GaussianTalker CUDA rasterizer needs gsplat: pip install gsplat "
            "(CUDA only; it compiles its kernels with the local CUDA toolkit)"
        ) from exc
    return gsplat


def rasterize_gsplat(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    camera: Camera,
    background: torch.Tensor,
    *,
    near_plane: float = NEAR_PLANE,
    eps2d: float = EPS2D,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as ``rasterize_reference`` through ``gsplat.rasterization`` on CUDA.

    Inputs must be CUDA tensors; computed in float32. Returns (image [H, W, D], alpha [H, W])
    with image = C + (1 - alpha)·background, as gsplat composites.
    """
    _check_inputs(means, quats, scales, opacities, colors, background, camera)
    gsplat = _import_gsplat()
    dev = means.device
    if dev.type != "cuda":
        raise InvalidInput(f"rasterize_gsplat needs CUDA tensors, got {dev}")
    f32 = torch.float32
    quats = torch.nn.functional.normalize(quats.to(dev, f32), dim=-1)
    render, alphas, _meta = gsplat.rasterization(
        means.to(f32),
        quats,
        scales.to(dev, f32),
        opacities.to(dev, f32),
        colors.to(dev, f32),
        camera.viewmat.to(dev, f32)[None],
        camera.K.to(dev, f32)[None],
        camera.width,
        camera.height,
        near_plane=near_plane,
        far_plane=1e10,
        eps2d=eps2d,
        sh_degree=None,
        packed=False,
        rasterize_mode="classic",
        render_mode="RGB",
        backgrounds=None,
    )
    alpha = alphas[0, ..., 0]
    bg = background.to(dev, f32)
    return render[0] + (1.0 - alpha)[..., None] * bg, alpha


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    camera: Camera,
    background: torch.Tensor,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gsplat on a CUDA ``device`` (default: that of ``means``) when it imports, else the
    reference rasterizer (on that device). Inputs are moved to the device."""
    dev = torch.device(device) if device is not None else means.device
    args = [t.to(dev) for t in (means, quats, scales, opacities, colors)]
    bg = background.to(dev)
    if dev.type == "cuda" and gsplat_available():
        return rasterize_gsplat(*args, camera, bg)
    return rasterize_reference(*args, camera, bg)
