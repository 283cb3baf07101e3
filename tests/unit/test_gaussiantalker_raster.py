"""The GaussianTalker rasterizers: the pure-torch reference on CPU, gsplat against it on CUDA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from farm.errors import InvalidInput, MissingDependency
from models.gaussiantalker.raster import (
    SH_C0,
    SH_C1,
    Camera,
    colors_from_sh,
    gsplat_available,
    rasterize,
    rasterize_gsplat,
    rasterize_reference,
    sh_to_rgb,
)

W, H = 128, 96
FOV = math.radians(45.0)


def _camera(R=None, T=None, w=W, h=H):
    R = np.eye(3) if R is None else R
    T = np.zeros(3) if T is None else T
    return Camera.from_fov(R, T, FOV, 2 * math.atan(h / w * math.tan(FOV / 2)), w, h)


def _scene(n=40, seed=0, z=3.0, opacity_max=1.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.4, 0.3, 0.3]) + torch.tensor([0, 0, z])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.08 + 0.01
    opacities = torch.rand(n, generator=g) * opacity_max
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opacities, colors


def _one(mean, scale, quat=(1.0, 0.0, 0.0, 0.0), opacity=0.8, color=(1.0, 0.0, 0.0)):
    t = torch.tensor
    return (
        t([mean], dtype=torch.float64),
        t([quat], dtype=torch.float64),
        t([scale], dtype=torch.float64),
        t([opacity], dtype=torch.float64),
        t([color], dtype=torch.float64),
    )


def _rotmat_to_quat(R: np.ndarray) -> np.ndarray:
    """wxyz quaternion of a rotation matrix (test helper, trace method)."""
    w = math.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    return np.array([w, x, y, z])


def _quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def _random_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


# --- camera -------------------------------------------------------------------------------


def test_from_fov_matches_upstream_camera_and_projection():
    R = _random_rotation(1)  # upstream's Camera.R: camera-to-world rotation
    T = np.array([[0.1, -0.2, 2.5]])  # upstream's readers hand T as [1, 3]
    cam = Camera.from_fov(R, T, 0.8, 0.6, 200, 150)
    # upstream: getWorld2View2 puts R^T and T in a 4x4, then transposes it for GLSL.
    rt = np.eye(4)
    rt[:3, :3] = R.T
    rt[:3, 3] = T
    np.testing.assert_allclose(cam.viewmat.numpy(), rt, atol=1e-12)
    np.testing.assert_allclose(cam.center.numpy(), np.linalg.inv(rt)[:3, 3], atol=1e-12)
    assert cam.K[0, 0].item() == pytest.approx(200 / (2 * math.tan(0.4)))
    assert cam.K[1, 1].item() == pytest.approx(150 / (2 * math.tan(0.3)))
    assert (cam.K[0, 2].item(), cam.K[1, 2].item()) == (100.0, 75.0)

    # Upstream's projection: OpenGL-style matrix from the FoVs, NDC to pixels with integer
    # pixel centres, ((ndc + 1) * S - 1) / 2. Here centres are at +0.5: the same image.
    near, far = 0.01, 100.0
    tx, ty = math.tan(0.4), math.tan(0.3)
    P = np.zeros((4, 4))
    P[0, 0], P[1, 1] = 1 / tx, 1 / ty
    P[3, 2], P[2, 2], P[2, 3] = 1.0, far / (far - near), -far * near / (far - near)
    pts = np.array([[0.3, -0.1, 0.2], [-0.5, 0.4, -0.3], [0.0, 0.0, 0.0]])
    hom = (P @ rt @ np.c_[pts, np.ones(3)].T).T
    ndc = hom[:, :2] / hom[:, 3:]
    upstream_pix = ((ndc + 1) * np.array([200, 150]) - 1) / 2
    ours = cam.project(torch.from_numpy(pts)).numpy() - 0.5
    np.testing.assert_allclose(ours, upstream_pix, atol=1e-9)


def test_camera_rejects_bad_input():
    with pytest.raises(InvalidInput):
        Camera(viewmat=torch.eye(3), K=torch.eye(3), width=4, height=4)
    with pytest.raises(InvalidInput):
        Camera(viewmat=torch.eye(4), K=torch.eye(3), width=0, height=4)


# --- spherical harmonics ------------------------------------------------------------------


def test_sh_degree0_is_dc_colour():
    g = torch.Generator().manual_seed(3)
    dc = torch.randn(10, 1, 3, generator=g)
    dirs = torch.randn(10, 3, generator=g)
    rgb = sh_to_rgb(dc, dirs)
    torch.testing.assert_close(rgb, (SH_C0 * dc[:, 0] + 0.5).clamp_min(0))
    # Degree 0 of a degree-3 model ignores the higher bands and the direction.
    full = torch.cat([dc, torch.randn(10, 15, 3, generator=g)], dim=1)
    torch.testing.assert_close(sh_to_rgb(full, dirs, degree=0), rgb)


def test_sh_degree1_and_clamp():
    sh = torch.zeros(2, 4, 3)
    sh[:, 0] = 0.2
    sh[:, 2] = 1.0  # the z band
    sh[:, 3] = 2.0  # the x band, with a minus sign
    dirs = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])  # normalised inside
    rgb = sh_to_rgb(sh, dirs)
    torch.testing.assert_close(rgb[0], torch.full((3,), SH_C0 * 0.2 + SH_C1 + 0.5))
    torch.testing.assert_close(rgb[1], torch.full((3,), max(SH_C0 * 0.2 - 2 * SH_C1 + 0.5, 0.0)))
    assert rgb[1].eq(0).all()  # clamped at 0


def test_sh_degree3_matches_numerical_band_orthogonality():
    # Each band of degree l is a homogeneous polynomial of degree l in the direction, so
    # sh(-d) - 0.5 flips the sign of the odd bands only.
    g = torch.Generator().manual_seed(4)
    sh = torch.randn(50, 16, 3, generator=g, dtype=torch.float64) * 0.1
    sh[:, 0] = 5.0  # keep clear of the clamp
    d = torch.randn(50, 3, generator=g, dtype=torch.float64)
    even = sh.clone()
    even[:, 1:4] = 0
    even[:, 9:16] = 0
    torch.testing.assert_close(
        sh_to_rgb(sh, d) + sh_to_rgb(sh, -d), 2 * sh_to_rgb(even, d), rtol=1e-12, atol=1e-12
    )


def test_colors_from_sh_uses_camera_centre():
    cam = _camera(T=np.array([1.0, 0.0, 0.0]))  # centre at x = -1
    sh = torch.zeros(1, 4, 3)
    sh[0, 3] = 1.0
    rgb = colors_from_sh(torch.tensor([[0.0, 0.0, 0.0]]), sh, cam)  # seen along +x
    torch.testing.assert_close(rgb, torch.full((1, 3), 0.5 - SH_C1))


def test_sh_rejects_bad_shapes():
    with pytest.raises(InvalidInput):
        sh_to_rgb(torch.zeros(2, 5, 3), torch.zeros(2, 3))
    with pytest.raises(InvalidInput):
        sh_to_rgb(torch.zeros(2, 4, 3), torch.zeros(2, 3), degree=2)


# --- reference rasterizer ---------------------------------------------------------------


def test_zero_opacity_is_background_bitwise():
    means, quats, scales, opacities, colors = _scene()
    bg = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(7))
    rgb, alpha = rasterize_reference(
        means, quats, scales, torch.zeros_like(opacities), colors, _camera(), bg
    )
    assert torch.equal(rgb, bg)
    assert torch.equal(alpha, torch.zeros(H, W))
    rgb, _ = rasterize_reference(
        means, quats, scales, opacities * 0, colors, _camera(), torch.tensor([0.1, 0.2, 0.3])
    )
    assert torch.equal(rgb, torch.tensor([0.1, 0.2, 0.3]).expand(H, W, 3))


def test_single_gaussian_centre_and_peak():
    cam = _camera(R=_random_rotation(5), T=np.array([0.05, -0.03, 3.0]))
    world = cam.rotation.T @ (
        torch.tensor([0.31, -0.17, 3.2], dtype=torch.float64) - cam.translation
    )
    args = _one(world.tolist(), (0.03, 0.03, 0.03))
    _, alpha = rasterize_reference(*args, cam, torch.zeros(3))
    # Expected pixel: K (R x + t), computed independently in numpy.
    p = cam.viewmat.numpy() @ np.r_[world.numpy(), 1.0]
    uv = (cam.K.numpy() @ p[:3])[:2] / p[2]
    peak = int(torch.argmax(alpha))
    i, j = divmod(peak, W)
    assert abs(j + 0.5 - uv[0]) <= 0.5 and abs(i + 0.5 - uv[1]) <= 0.5
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    centroid = ((alpha * xs).sum() / alpha.sum(), (alpha * ys).sum() / alpha.sum())
    assert abs(centroid[0] - uv[0]) < 0.02 and abs(centroid[1] - uv[1]) < 0.02


@pytest.mark.parametrize("angle", [0.0, math.atan2(3, 4)])
def test_single_gaussian_footprint(angle):
    cam = _camera()
    f = cam.K[0, 0].item()
    z = 4.0
    # Centre on the pixel centre (64.5, 48.5); a flat Gaussian (tiny z scale) rotated by
    # `angle` about the view axis, with 1-sigma footprints of 10 and 5 px after the 0.3 px²
    # dilation. Along (cos, sin) at 10 px and (-sin, cos) at 5 px the offsets are integers.
    s_major = math.sqrt(10.0**2 - 0.3) * z / f
    s_minor = math.sqrt(5.0**2 - 0.3) * z / f
    quat = (math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2))
    mean = (0.5 * z / f, 0.5 * z / f, z)
    opacity = 0.7
    _, alpha = rasterize_reference(
        *_one(mean, (s_major, s_minor, 1e-5), quat, opacity), cam, torch.zeros(3)
    )
    ci, cj = 48, 64
    assert alpha[ci, cj].item() == pytest.approx(opacity, rel=1e-6)
    c, s = math.cos(angle), math.sin(angle)
    expected = opacity * math.exp(-0.5)
    for du, dv in ((10 * c, 10 * s), (-5 * s, 5 * c)):
        for sign in (1, -1):
            i, j = ci + round(sign * dv), cj + round(sign * du)
            assert alpha[i, j].item() == pytest.approx(expected, rel=1e-4)
    # Two sigma along the major axis.
    i, j = ci + round(20 * s), cj + round(20 * c)
    assert alpha[i, j].item() == pytest.approx(opacity * math.exp(-2), rel=1e-4)


def test_camera_translation_shifts_image():
    means, quats, scales, opacities, colors = _scene(n=30, seed=2, z=4.0)
    means[:, 2] = 4.0  # one depth plane: every point shifts by the same f·d/z
    scales[:, 2] = 1e-5
    quats[:, 1:3] = 0.0  # rotations about the view axis only: flat in the image plane
    bg = torch.tensor([0.2, 0.3, 0.4])
    cam0 = _camera()
    f = cam0.K[0, 0].item()
    shift = 8
    d = shift * 4.0 / f
    cam1 = _camera(T=np.array([-d, 0.0, 0.0]))  # camera centre moved right by d
    assert cam1.center[0].item() == pytest.approx(d)
    args = (means.double(), quats.double(), scales.double(), opacities.double(), colors.double())
    rgb0, a0 = rasterize_reference(*args, cam0, bg.double())
    rgb1, a1 = rasterize_reference(*args, cam1, bg.double())
    torch.testing.assert_close(rgb1[:, : W - shift], rgb0[:, shift:], atol=1e-6, rtol=0)
    torch.testing.assert_close(a1[:, : W - shift], a0[:, shift:], atol=1e-6, rtol=0)
    assert (a0[:, shift:] > 0.1).any()


def test_rigid_transform_invariance():
    # Rendering the scene with a camera (Rw, t) equals rendering the scene moved into that
    # camera's frame with the identity camera: checks viewmat use on means and covariances.
    means, quats, scales, opacities, colors = (x.double() for x in _scene(n=60, seed=9))
    Rw = _random_rotation(11)
    cam_id = _camera()
    t = np.array([0.1, -0.05, 0.2])
    cam = Camera(
        viewmat=np.block([[Rw, t[:, None]], [np.zeros((1, 3)), 1]]), K=cam_id.K, width=W, height=H
    )
    # world points so that R x + t lands where the original scene is in camera space
    world = (means - torch.from_numpy(t)) @ torch.from_numpy(Rw)
    q_inv = torch.from_numpy(_rotmat_to_quat(Rw.T))
    world_q = _quat_mul(q_inv.expand_as(quats), torch.nn.functional.normalize(quats, dim=-1))
    bg = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    rgb0, a0 = rasterize_reference(means, quats, scales, opacities, colors, cam_id, bg)
    rgb1, a1 = rasterize_reference(world, world_q, scales, opacities, colors, cam, bg)
    torch.testing.assert_close(rgb1, rgb0, atol=1e-9, rtol=0)
    torch.testing.assert_close(a1, a0, atol=1e-9, rtol=0)


def test_depth_order_near_hides_far():
    cam = _camera()
    f = cam.K[0, 0].item()
    near = _one((0.5 * 3 / f, 0.5 * 3 / f, 3.0), (0.3, 0.3, 0.3), opacity=1.0, color=(1, 0, 0))
    far = _one((0.5 * 6 / f, 0.5 * 6 / f, 6.0), (0.3, 0.3, 0.3), opacity=1.0, color=(0, 1, 0))
    for first, second in ((near, far), (far, near)):  # input order must not matter
        args = [torch.cat([a, b]) for a, b in zip(first, second, strict=True)]
        rgb, alpha = rasterize_reference(*args, cam, torch.zeros(3, dtype=torch.float64))
        centre = rgb[48, 64]
        # Clamped at 0.99: red 0.99, green 0.99 · 0.01 behind it.
        assert centre[0].item() == pytest.approx(0.99, abs=1e-6)
        assert centre[1].item() == pytest.approx(0.99 * 0.01, abs=1e-6)
        assert alpha[48, 64].item() == pytest.approx(1 - 0.01 * 0.01, abs=1e-6)
    # Behind the near plane: dropped.
    behind = _one((0.0, 0.0, 0.1), (0.3, 0.3, 0.3), opacity=1.0)
    _, alpha = rasterize_reference(*behind, cam, torch.zeros(3, dtype=torch.float64))
    assert alpha.abs().max().item() == 0.0


def _naive(means, quats, scales, opacities, colors, camera, bg):
    """Per pixel, per Gaussian loops over the reference's own projection: checks the tiling,
    culling and compositing (upstream's loop, written out)."""
    from models.gaussiantalker.raster import ALPHA_MAX, EPS2D, NEAR_PLANE, _project

    centre, conic, _, depth, valid = _project(means, quats, scales, camera, NEAR_PLANE, EPS2D)
    order = [i for i in torch.argsort(depth, stable=True).tolist() if valid[i]]
    out = np.zeros((camera.height, camera.width, 3))
    for y in range(camera.height):
        for x in range(camera.width):
            T, C = 1.0, np.zeros(3)
            for g in order:
                dx, dy = centre[g, 0].item() - x - 0.5, centre[g, 1].item() - y - 0.5
                a, b, c = conic[g].tolist()
                power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
                if power > 0:
                    continue
                alpha = min(ALPHA_MAX, opacities[g].item() * math.exp(power))
                if alpha < 1 / 255:
                    continue
                test_T = T * (1 - alpha)
                if test_T < 1e-4:
                    break
                C += colors[g].numpy() * alpha * T
                T = test_T
            out[y, x] = C + T * bg.numpy()
    return out


def test_reference_matches_naive_loop():
    w, h = 20, 14
    cam = _camera(w=w, h=h)
    # Big, stacked, fairly opaque Gaussians: about 30 pixels end early (T < 1e-4) and
    # many contributions fall below 1/255 (both checked to matter, by 4e-4 and 1e-2).
    means, quats, scales, opacities, colors = (x.double() for x in _scene(n=30, seed=5))
    means[:, :2] *= 0.3
    scales = scales * 4 + 0.05
    opacities = 0.4 + opacities * 0.6
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    rgb, _ = rasterize_reference(means, quats, scales, opacities, colors, cam, bg)
    np.testing.assert_allclose(
        rgb.numpy(), _naive(means, quats, scales, opacities, colors, cam, bg), atol=1e-12
    )


def test_deterministic_and_cpu_dispatch():
    args = _scene(n=200, seed=8)
    cam = _camera()
    bg = torch.tensor([0.0, 0.0, 1.0])
    first = rasterize_reference(*args, cam, bg)
    second = rasterize_reference(*args, cam, bg)
    via = rasterize(*args, cam, bg, device="cpu")
    for x, y, z in zip(first, second, via, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert first[0].shape == (H, W, 3) and first[1].shape == (H, W)
    assert first[0].dtype == torch.float32


def test_speed_budget():
    import time

    args = _scene(n=300, seed=1)
    cam = Camera.from_fov(np.eye(3), np.zeros(3), FOV, FOV, 512, 512)
    start = time.perf_counter()
    rasterize_reference(*args, cam, torch.ones(3))
    assert time.perf_counter() - start < 5.0


def test_rejects_bad_shapes():
    means, quats, scales, opacities, colors = _scene(n=5)
    with pytest.raises(InvalidInput):
        rasterize_reference(means, quats[:4], scales, opacities, colors, _camera(), torch.zeros(3))
    with pytest.raises(InvalidInput):
        rasterize_reference(means, quats, scales, opacities, colors, _camera(), torch.zeros(H, 3))


@pytest.mark.skipif(gsplat_available(), reason="gsplat is installed")
def test_gsplat_missing_is_a_clear_error():
    args = _scene(n=5)
    with pytest.raises(MissingDependency, match="gsplat"):
        rasterize_gsplat(*args, _camera(), torch.zeros(3))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and gsplat_available()), reason="needs CUDA and gsplat"
)
def test_gsplat_matches_reference():
    # Opacities below 0.99 keep clear of gsplat's 0.999 clamp (upstream's is 0.99).
    means, quats, scales, opacities, colors = _scene(n=300, seed=12, opacity_max=0.95)
    cam = _camera(R=_random_rotation(2), T=np.array([0.0, 0.0, 0.5]))
    means = (means - cam.translation.float()) @ cam.rotation.float()  # in front of it
    bg = torch.rand(H, W, 3, generator=torch.Generator().manual_seed(1))
    ref_rgb, ref_a = rasterize_reference(means, quats, scales, opacities, colors, cam, bg)
    cuda = [x.cuda() for x in (means, quats, scales, opacities, colors)]
    rgb, a = rasterize_gsplat(*cuda, cam, bg.cuda())
    diff = (rgb.cpu() - ref_rgb).abs()
    # gsplat's tile bounds (3 sigma in some versions) may drop contributions of up to
    # opacity·exp(-4.5) at the rim; the bulk must agree to float32 rounding.
    assert diff.mean().item() < 1e-3, diff.mean().item()
    assert diff.max().item() < 2e-2, diff.max().item()
    assert (a.cpu() - ref_a).abs().mean().item() < 1e-3
    zero_rgb, _ = rasterize_gsplat(*cuda[:3], cuda[3] * 0, cuda[4], cam, bg.cuda())
    assert torch.equal(zero_rgb.cpu(), bg)
