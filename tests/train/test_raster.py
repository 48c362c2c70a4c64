"""train.raster: the CPU rasterizer against a per-pixel reference, gradients, the pinhole
model, gsplat's DefaultStrategy, a small fit, and (with a GPU) gsplat's CUDA rasterizer."""

from __future__ import annotations

import math
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gsplat")

from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci  # noqa: E402
from gsplat.strategy import DefaultStrategy  # noqa: E402

from train import raster_c  # noqa: E402
from train.raster import rasterize  # noqa: E402

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny scenes gain nothing from threads, and on a busy 2-core machine OpenMP's
    waits between small ops make the tests slow and their time erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _look_at(eye: list[float], target: list[float], dtype=torch.float64) -> torch.Tensor:
    """World-to-camera matrix (OpenCV axes) of a camera at ``eye`` looking at ``target``."""
    eye_t, target_t = torch.tensor(eye, dtype=dtype), torch.tensor(target, dtype=dtype)
    forward = torch.nn.functional.normalize(target_t - eye_t, dim=0)
    right = torch.nn.functional.normalize(
        torch.linalg.cross(forward, torch.tensor([0.0, -1.0, 0.0], dtype=dtype)), dim=0
    )
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    view = torch.eye(4, dtype=dtype)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ eye_t
    return view


def _intrinsics(fx: float, fy: float, cx: float, cy: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def _reference(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None, backgrounds=None):
    """Per-pixel front-to-back compositing with gsplat's rules, in float64 Python loops.

    Projection comes from gsplat's pure-torch helpers; degree-1 SH is written out here.
    Returns render [C, H, W, D + 1] (last channel: accumulated depth), alpha [C, H, W] and
    how many pixels stopped at the transmittance cutoff.
    """
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmats, Ks, width, height)
    n_cams = viewmats.shape[0]
    if sh_degree is None:
        rgb = colors[None].expand(n_cams, -1, -1)
    else:
        assert sh_degree in (0, 1)
        centres = torch.linalg.inv(viewmats)[:, :3, 3]
        d = torch.nn.functional.normalize(means[None] - centres[:, None], dim=-1)
        x, y, z = d.unbind(-1)
        rgb = SH_C0 * colors[None, :, 0]
        if sh_degree == 1:
            rgb = rgb + SH_C1 * (
                -y[..., None] * colors[:, 1] + z[..., None] * colors[:, 2] - x[..., None] * colors[:, 3]
            )
        rgb = torch.clamp_min(rgb + 0.5, 0.0)
    dim = rgb.shape[-1]
    render = torch.zeros(n_cams, height, width, dim + 1, dtype=torch.float64)
    alpha_img = torch.zeros(n_cams, height, width, dtype=torch.float64)
    n_stopped = 0
    for cam in range(n_cams):
        order = sorted(range(means.shape[0]), key=lambda g: float(depths[cam, g]))
        for i in range(height):
            for j in range(width):
                px, py = j + 0.5, i + 0.5
                t, out = 1.0, [0.0] * (dim + 1)
                for g in order:
                    r = float(radii[cam, g])
                    mx, my = (float(v) for v in means2d[cam, g])
                    if r <= 0 or abs(px - mx) > r or abs(py - my) > r:
                        continue
                    a, b, c = (float(v) for v in conics[cam, g])
                    dx, dy = mx - px, my - py
                    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                    alpha = min(0.999, float(opacities[g]) * math.exp(-sigma))
                    if sigma < 0 or alpha < 1 / 255:
                        continue
                    if t * (1 - alpha) <= 1e-4:
                        n_stopped += 1
                        break
                    values = [*(float(v) for v in rgb[cam, g]), float(depths[cam, g])]
                    out = [o + alpha * t * v for o, v in zip(out, values)]
                    t *= 1 - alpha
                if backgrounds is not None:
                    out[:dim] = [o + t * float(bg) for o, bg in zip(out[:dim], backgrounds[cam])]
                render[cam, i, j] = torch.tensor(out, dtype=torch.float64)
                alpha_img[cam, i, j] = 1 - t
    return render, alpha_img, n_stopped


def _reference_scene(sh_coeffs: int | None = None):
    """~20 Gaussians for a 12x10 image: some behind the camera, off-screen, cut by the
    image border, and two very opaque ones stacked to hit the transmittance cutoff."""
    gen = torch.Generator().manual_seed(7)
    n = 16
    means = torch.cat(
        [
            torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2.4 - 1.2,
            torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2.0 - 1.0,
        ],
        dim=1,
    )
    extra = torch.tensor(
        [
            [0.1, 0.0, -5.5],  # behind both cameras (they sit near z = -4, looking towards +z)
            [0.0, 0.2, -6.0],  # behind both cameras
            [9.0, 0.0, 0.0],  # far off-screen
            [1.75, 0.3, 0.0],  # partly cut by the image border
            [0.2, 0.1, -0.5],  # very opaque, in front
            [0.25, 0.05, -0.2],  # very opaque, behind the first one
        ],
        dtype=torch.float64,
    )
    means = torch.cat([means, extra])
    total = len(means)
    scales = torch.rand(total, 3, generator=gen, dtype=torch.float64) * 0.25 + 0.05
    scales[-2:] = 0.6
    quats = torch.randn(total, 4, generator=gen, dtype=torch.float64) * 2.0  # not normalised
    opacities = torch.rand(total, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    opacities[-2:] = 0.99999
    if sh_coeffs is None:
        colors = torch.rand(total, 3, generator=gen, dtype=torch.float64)
    else:
        colors = torch.randn(total, sh_coeffs, 3, generator=gen, dtype=torch.float64) * 0.6
    viewmats = torch.stack(
        [_look_at([0.3, -0.4, -4.0], [0.0, 0.0, 0.0]), _look_at([-1.0, -0.5, -3.5], [0.2, 0.0, 0.0])]
    )
    Ks = torch.stack([_intrinsics(14.0, 13.0, 6.2, 4.9), _intrinsics(12.0, 12.0, 6.0, 5.0)])
    return means, quats, scales, opacities, colors, viewmats, Ks


BACKENDS = ["c", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Both compositing paths: the compiled one (skipped where no C compiler) and torch ops."""
    if request.param == "c" and not raster_c.available():
        pytest.skip(f"no compiled compositing: {raster_c.why_not()}")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_per_pixel_reference_rgb(dtype, backend):
    means, quats, scales, opacities, colors, viewmats, Ks = _reference_scene()
    backgrounds = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]], dtype=torch.float64)
    ref, ref_alpha, n_stopped = _reference(
        means, quats, scales, opacities, colors, viewmats, Ks, 12, 10, backgrounds=backgrounds
    )
    assert n_stopped > 0, "the scene exercises the transmittance cutoff"

    args = [t.to(dtype) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]
    render, alpha, info = rasterize(*args, 12, 10, render_mode="RGB+ED", backgrounds=backgrounds.to(dtype),
                                    backend=backend)

    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert render.shape == (2, 10, 12, 4) and alpha.shape == (2, 10, 12, 1)
    torch.testing.assert_close(alpha[..., 0].double(), ref_alpha, atol=tol, rtol=0)
    torch.testing.assert_close(render[..., :3].double(), ref[..., :3], atol=tol, rtol=0)
    expected_depth = ref[..., 3] / ref_alpha.clamp(min=1e-10)
    torch.testing.assert_close(render[..., 3].double(), expected_depth, atol=tol * 100, rtol=tol)
    depth, _, _ = rasterize(*args, 12, 10, render_mode="D", backgrounds=backgrounds.to(dtype), backend=backend)
    torch.testing.assert_close(depth[..., 0].double(), ref[..., 3], atol=tol * 10, rtol=0)

    radii = info["radii"]
    assert radii.dtype == torch.int32 and radii.shape == (2, len(means))
    assert (radii[:, 16:18] == 0).all(), "Gaussians behind the camera are not drawn"
    assert (radii[:, 18] == 0).all(), "the off-screen Gaussian is not drawn"
    assert (radii[0, 19] > 0) and (alpha[0, :, -1] > 0.01).any(), "the border Gaussian is drawn where it overlaps"
    assert alpha.max() < 1 - 1e-4


def test_matches_dense_reference_on_a_crowded_scene(backend):
    """2000 Gaussians over 64x48, most pixels reaching the T cutoff, against a dense
    [pixels, Gaussians] evaluation of the same rules (one camera, RGB)."""
    width, height, f = 64, 48, 60.0
    gen = torch.Generator().manual_seed(11)
    params = _random_gaussians(2000, seed=11, width=width, height=height, f=f)
    means, quats = params["means"].double(), params["quats"].double()
    scales = torch.exp(params["scales"]).double() * (1 + 3 * torch.rand(2000, 1, generator=gen, dtype=torch.float64))
    opacities = torch.rand(2000, generator=gen, dtype=torch.float64)
    colors = torch.rand(2000, 3, generator=gen, dtype=torch.float64)
    viewmats = _look_at([0.1, 0.05, -0.2], [0.0, 0.0, 3.0])[None]
    Ks = _intrinsics(f, f, width / 2 + 0.3, height / 2 - 0.2)[None]

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmats, Ks, width, height)
    order = torch.argsort(depths[0], stable=True)
    (mx, my), (a, b, c) = means2d[0, order].T[:, None], conics[0, order].T[:, None]
    radius = radii[0, order].double()[None]
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    dx, dy = mx - cols.reshape(-1, 1).double(), my - rows.reshape(-1, 1).double()  # [pixels, Gaussians]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp_max(opacities[order] * torch.exp(-sigma), 0.999)
    in_box = (radius > 0) & (dx.abs() <= radius) & (dy.abs() <= radius)
    alpha = torch.where(in_box & (sigma >= 0) & (alpha >= 1 / 255), alpha, 0.0)
    t_after = torch.cumprod(1 - alpha, dim=1)
    weights = torch.where(t_after > 1e-4, alpha * t_after / (1 - alpha), 0.0)
    assert ((weights > 0) != (alpha > 0)).any(1).float().mean() > 0.5, "most pixels reach the cutoff"

    render, alpha_img, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                     backend=backend)
    torch.testing.assert_close(render[0].reshape(-1, 3), weights @ colors[order], atol=1e-9, rtol=0)
    torch.testing.assert_close(alpha_img[0].reshape(-1), weights.sum(1), atol=1e-9, rtol=0)


def test_transmittance_cutoff_excludes_the_gaussian_that_crosses_it():
    """Three stacked opaque Gaussians: the second would take T to 1e-6, so only the first is drawn."""
    means = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(3, 1)
    scales = torch.full((3, 3), 1.0)
    opacities = torch.ones(3)
    colors = torch.eye(3)
    Ks = _intrinsics(4.0, 4.0, 4.5, 4.5, torch.float32)[None]  # the means project onto pixel (4, 4)'s centre
    render, alpha, _ = rasterize(means, quats, scales, opacities, colors, torch.eye(4)[None], Ks, 8, 8)
    centre = render[0, 4, 4]
    torch.testing.assert_close(centre, torch.tensor([0.999, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha[0, 4, 4, 0], torch.tensor(0.999), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sh_coeffs", [4, 9])
def test_matches_per_pixel_reference_sh_degree_1(sh_coeffs):
    """Degree-1 SH, with coefficients for degree 1 or (partly used) degree 2."""
    means, quats, scales, opacities, colors, viewmats, Ks = _reference_scene(sh_coeffs=sh_coeffs)
    ref, ref_alpha, _ = _reference(means, quats, scales, opacities, colors, viewmats, Ks, 12, 10, sh_degree=1)
    render, alpha, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 12, 10, sh_degree=1)
    torch.testing.assert_close(alpha[..., 0], ref_alpha, atol=1e-9, rtol=0)
    torch.testing.assert_close(render, ref[..., :3], atol=1e-9, rtol=0)


def test_gradients_match_finite_differences(backend):
    """float64 gradcheck on a tiny scene of wide Gaussians. The alpha and T cutoffs are
    discontinuous; with these values no pixel lies within a finite-difference step of one."""
    gen = torch.Generator().manual_seed(3)
    means = torch.tensor([[-0.3, -0.2, 3.0], [0.25, 0.1, 3.5], [0.0, 0.25, 4.0]], dtype=torch.float64)
    scales = torch.tensor([[0.5, 0.4, 0.45], [0.6, 0.35, 0.5], [0.45, 0.55, 0.4]], dtype=torch.float64)
    quats = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    opacities = torch.tensor([0.6, 0.5, 0.7], dtype=torch.float64)
    colors = torch.rand(3, 3, generator=gen, dtype=torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64)[None]
    Ks = _intrinsics(8.0, 8.0, 4.0, 3.0)[None]

    def render(means, quats, scales, opacities, colors):
        image, alpha, _ = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 8, 6, backend=backend)
        return image, alpha

    inputs = tuple(t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gaussian_lands_where_the_pinhole_model_says():
    fx, fy, cx, cy = 100.0, 120.0, 40.0, 30.5
    viewmat = torch.eye(4)
    viewmat[:3, 3] = torch.tensor([0.1, -0.2, 0.5])  # camera moved: world point + t is the camera point
    cam_point = torch.tensor([0.31, -0.05, 2.0])  # x/z = 0.155, y/z = -0.025
    means = (cam_point - viewmat[:3, 3])[None]
    quats, scales = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.full((1, 3), 0.004)
    opacities, colors = torch.tensor([0.9]), torch.ones(1, 3)
    Ks = _intrinsics(fx, fy, cx, cy, torch.float32)[None]
    _, alpha, info = rasterize(means, quats, scales, opacities, colors, viewmat[None], Ks, 80, 60)
    u = fx * cam_point[0] / cam_point[2] + cx - 0.5  # 0-based column of the peak
    v = fy * cam_point[1] / cam_point[2] + cy - 0.5
    assert (float(u), float(v)) == pytest.approx((55.0, 27.0), abs=1e-4)
    peak = int(alpha[0, ..., 0].argmax())
    assert divmod(peak, 80) == (round(float(v)), round(float(u)))
    torch.testing.assert_close(info["means2d"][0, 0], torch.stack([u, v]) + 0.5)
    weights = alpha[0, ..., 0]
    rows, cols = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    centroid = torch.stack([(weights * cols).sum(), (weights * rows).sum()]) / weights.sum()
    torch.testing.assert_close(centroid, torch.stack([u, v]), atol=0.05, rtol=0)


def _random_gaussians(n: int, seed: int, width: int = 64, height: int = 48, f: float = 60.0):
    """Gaussians spread over the view of an identity camera with focal length ``f``."""
    gen = torch.Generator().manual_seed(seed)
    z = 2.0 + 2.0 * torch.rand(n, generator=gen)
    x = (torch.rand(n, generator=gen) * width - width / 2) * z / f
    y = (torch.rand(n, generator=gen) * height - height / 2) * z / f
    return {
        "means": torch.stack([x, y, z], dim=-1),
        "scales": torch.log(0.03 + 0.04 * torch.rand(n, 3, generator=gen)),
        "quats": torch.randn(n, 4, generator=gen),
        "opacities": torch.logit(0.3 + 0.4 * torch.rand(n, generator=gen)),
        "sh0": (torch.rand(n, 1, 3, generator=gen) - 0.5) / SH_C0,
        "shN": torch.zeros(n, 3, 3),
    }


def _render_params(params, width: int = 64, height: int = 48, f: float = 60.0, max_pairs: int = 50_000_000,
                   **options):
    colors = torch.cat([params["sh0"], params["shN"]], dim=1)
    scales, opacities = torch.exp(params["scales"]), torch.sigmoid(params["opacities"])
    Ks = _intrinsics(f, f, width / 2, height / 2, torch.float32)[None]
    return rasterize(
        params["means"],
        params["quats"],
        scales,
        opacities,
        colors,
        torch.eye(4)[None],
        Ks,
        width,
        height,
        sh_degree=1,
        max_pairs=max_pairs,
        **options,
    )


def _target_image(width: int = 64, height: int = 48) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([cols, rows, 0.5 + 0.4 * torch.sin(6 * cols) * torch.cos(4 * rows)], dim=-1)[None]


def test_default_strategy_runs_and_sees_screen_space_gradients():
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in _random_gaussians(300, seed=1).items()})
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    strategy = DefaultStrategy(refine_start_iter=2, refine_every=3, reset_every=1000, grow_grad2d=1e-5)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    target = _target_image()
    for step in range(8):
        render, _, info = _render_params(params)
        loss = (render - target).abs().mean()
        strategy.step_pre_backward(params, optimizers, state, step, info)
        loss.backward()
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        if step == 1:  # accumulated over steps 0 and 1, before the first refinement resets it
            visible = info["radii"][0] > 0
            assert visible.sum() > 250
            assert (state["grad2d"][visible] > 0).float().mean() > 0.9
            assert (state["grad2d"][~visible] == 0).all()
            assert (state["count"][visible] >= 1).all()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert len(params["means"]) != 300, "refinement grew or pruned Gaussians"
    assert all(len(p) == len(params["means"]) for p in params.values())


def test_small_fit_reduces_the_loss():
    torch.manual_seed(0)
    params = _random_gaussians(400, seed=2)
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    lrs = {"means": 2e-3, "scales": 1e-2, "quats": 1e-2, "opacities": 5e-2, "sh0": 2e-2, "shN": 2e-3}
    optimizer = torch.optim.Adam([{"params": [params[k]], "lr": lr} for k, lr in lrs.items()])
    target = _target_image()
    losses = []
    for _ in range(100):
        render, _, _ = _render_params(params)
        loss = (render - target).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_too_many_pairs_raise_a_clear_error(backend):
    params = _random_gaussians(50, seed=4)
    with pytest.raises(ValueError, match=r"pairs .* at 64x48 exceed max_pairs=100"):
        _render_params(params, max_pairs=100, backend=backend)


def _training_like_scene(n: int = 3000, seed: int = 5):
    """float32 Gaussians over 70x50 (not a multiple of the tile), SH degree 1, most pixels at the cutoff."""
    params = _random_gaussians(n, seed=seed, width=70, height=50)
    params["scales"] = params["scales"] + 0.7
    params["opacities"] = params["opacities"] + 1.5
    params["shN"] = torch.randn(n, 3, 3, generator=torch.Generator().manual_seed(seed)) * 0.2
    return {k: v.clone().requires_grad_() for k, v in params.items()}


def _render_and_grads(params, backend, threads):
    torch.set_num_threads(threads)
    for p in params.values():
        p.grad = None
    render, alpha, info = _render_params(params, width=70, height=50, backend=backend, render_mode="RGB+ED")
    info["means2d"].retain_grad()
    weights = torch.linspace(0.5, 1.5, render.numel()).reshape(render.shape)
    ((render * weights).sum() + 2.0 * alpha.sum()).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    return render.detach(), alpha.detach(), grads, info["means2d"].grad.clone()


def test_compiled_and_torch_compositing_agree_with_their_gradients():
    """The training path (float32, SH, depth channel, a weighted loss on colour and alpha):
    the compiled compositing renders and differentiates as the torch ops do, and its result
    does not depend on the number of threads (its gradients are summed in a fixed order)."""
    if not raster_c.available():
        pytest.skip(f"no compiled compositing: {raster_c.why_not()}")
    params = _training_like_scene()
    render_t, alpha_t, grads_t, g2d_t = _render_and_grads(params, "torch", 1)
    render_c, alpha_c, grads_c, g2d_c = _render_and_grads(params, "c", 1)
    assert (alpha_t > 0.99).float().mean() > 0.3, "a crowded scene"
    torch.testing.assert_close(render_c, render_t, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(alpha_c, alpha_t, atol=2e-5, rtol=0)
    for name in grads_t:
        scale = grads_t[name].abs().max()
        torch.testing.assert_close(grads_c[name], grads_t[name], atol=1e-4 * scale, rtol=1e-3, msg=name)
    torch.testing.assert_close(g2d_c, g2d_t, atol=1e-4 * g2d_t.abs().max(), rtol=1e-3)
    _, _, grads_2, g2d_2 = _render_and_grads(params, "c", 2)
    for name in grads_c:
        assert torch.equal(grads_2[name], grads_c[name]), f"{name}: two threads changed the gradient"
    assert torch.equal(g2d_2, g2d_c)


def test_compiled_compositing_is_built_once_and_a_broken_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINSTUDIO_CACHE", str(tmp_path))
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    lib = raster_c._build()
    assert lib.parent == tmp_path and lib.is_file()
    stamp = lib.stat().st_mtime_ns
    assert raster_c._build() == lib and lib.stat().st_mtime_ns == stamp, "a second use does not rebuild"
    monkeypatch.setenv("CC", "false")
    with pytest.raises(OSError, match=r"false failed on _raster_cpu.c"):
        raster_c._build()
    assert [p.name for p in tmp_path.iterdir()] == [lib.name], "no half-built library left behind"


@pytest.mark.gpu
def test_matches_gsplat_cuda_rasterization():
    import gsplat

    gen = torch.Generator().manual_seed(5)
    n, width, height = 3000, 96, 72
    params = _random_gaussians(n, seed=5, width=width, height=height, f=80.0)
    means, quats = params["means"], params["quats"]
    scales, opacities = torch.exp(params["scales"]), torch.sigmoid(params["opacities"])
    colors = torch.randn(n, 9, 3, generator=gen) * 0.4
    viewmats = _look_at([0.2, -0.1, -0.3], [0.0, 0.0, 3.0], torch.float32)[None]
    Ks = _intrinsics(80.0, 80.0, width / 2, height / 2, torch.float32)[None]
    args = (means, quats, scales, opacities, colors, viewmats, Ks, width, height)

    render, alpha, info = rasterize(*args, sh_degree=2, render_mode="RGB+ED")
    cuda_render, cuda_alpha, cuda_info = gsplat.rasterization(
        *(t.cuda() for t in args[:7]), width, height, sh_degree=2, render_mode="RGB+ED", packed=False
    )
    assert (info["radii"] == cuda_info["radii"].cpu()).float().mean() > 0.99
    assert (render[..., :3] - cuda_render[..., :3].cpu()).abs().mean() < 2e-3
    assert (alpha - cuda_alpha.cpu()).abs().mean() < 2e-3
