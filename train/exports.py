"""What a trained twin leaves behind for render teams: the splat PLY, checked, and labelled previews.

- ``<run>/splat.ply``: the Gaussians in the standard 3DGS layout
  (:mod:`train.splat_ply`), in studio metres, with one lighting preset's
  appearance baked into the base colour. The file is read back and re-rendered
  from a held-out camera; the difference from the trained model's own render is
  recorded (viewers broke on each of the layout's conventions: this catches a
  mistake before a render team does).
- ``<run>/previews/turntable/*.png`` and ``turntable.mp4``: an orbit around the
  subject, every frame labelled "AI-generated digital twin".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from train.dataset import TrainError, finite_or_none, require_dataset_consent
from train.preview import AI_LABEL, turntable_cameras, write_turntable
from train.splat_ply import SplatParams, read_splat_ply, splat_stats, write_splat_ply

PREVIEW_BACKGROUND = (0.85, 0.85, 0.85)


def splat_params(model, lighting: int | None = None) -> SplatParams:
    """The model's Gaussians as plain arrays, with a preset's appearance baked into the base colour."""
    import torch

    with torch.no_grad():
        return SplatParams(
            means=model.means.detach().cpu().numpy().astype(np.float32),
            log_scales=model.scales.detach().cpu().numpy().astype(np.float32),
            quats=model.quats.detach().cpu().numpy().astype(np.float32),
            opacity_logits=model.opacities.detach().cpu().numpy().reshape(-1).astype(np.float32),
            sh_dc=model.baked_features_dc(lighting).detach().cpu().numpy().astype(np.float32),
            sh_rest=model.features_rest.detach().cpu().numpy().astype(np.float32),
        )


#: turntable frames (width, height): a face must be recognisable, so at least 512 px tall on the CPU too
TURNTABLE_SIZE_GPU = (720, 960)
TURNTABLE_SIZE_CPU = (432, 576)
TURNTABLE_FOV_DEG = 45.0


def render_splat(params: SplatParams, viewmat: np.ndarray, K: np.ndarray, width: int, height: int, *,
                 device: str = "cpu", background=PREVIEW_BACKGROUND) -> np.ndarray:
    """Render a splat (as read from a PLY) from one camera; float RGB [H, W, 3] in [0, 1].

    ``viewmat`` is world-to-camera in OpenCV axes, ``K`` has pixel centres at +0.5.
    gsplat's CUDA rasteriser on a GPU, :mod:`train.raster` on the CPU.
    """
    import torch

    dev = torch.device(device)

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)

    colors = torch.cat([t(params.sh_dc)[:, None, :], t(params.sh_rest)], dim=1)
    kw = dict(means=t(params.means), quats=t(params.quats), scales=torch.exp(t(params.log_scales)),
              opacities=torch.sigmoid(t(params.opacity_logits)), colors=colors, viewmats=t(viewmat)[None],
              Ks=t(K)[None], width=int(width), height=int(height), sh_degree=params.sh_degree,
              backgrounds=t(background)[None])
    from train.raster import rasterize_on_device

    with torch.no_grad():
        render, _, _ = rasterize_on_device(**kw)
    return render[0, ..., :3].clamp(0, 1).cpu().numpy()


def _model_render(model, camera, background) -> np.ndarray:
    import torch

    was = model.training
    model.eval()
    saved = model.background_color
    model.background_color = torch.tensor(background, dtype=torch.float32)
    try:
        out = model.get_outputs_for_camera(camera.to(model.device))
    finally:
        model.background_color = saved
        model.train(was)
    return out["rgb"].detach().cpu().numpy()


def check_ply_against_model(model, params: SplatParams, camera, lighting: int) -> dict:
    """Re-render the PLY's Gaussians from ``camera`` and compare with the model's render (PSNR, max error)."""
    from rigs.geometry import nerfstudio_c2w_to_opencv

    cam = camera[0:1]  # a copy: its lighting is set below
    if cam.metadata is not None and "lighting" in cam.metadata:
        md = dict(cam.metadata)
        md["lighting"] = md["lighting"].clone().fill_(lighting)
        cam.metadata = md
    ref = _model_render(model, cam, PREVIEW_BACKGROUND)
    pose = nerfstudio_c2w_to_opencv(cam.camera_to_worlds[0].detach().cpu().numpy())
    K = cam.get_intrinsics_matrices()[0].detach().cpu().numpy()
    W, H = int(cam.width.item()), int(cam.height.item())
    got = render_splat(params, pose.matrix, K, W, H, device=str(model.device.type))
    mse = float(np.mean((ref - got) ** 2))
    out = {"psnr_vs_model": round(10 * math.log10(1 / mse), 2) if 0 < mse < math.inf else None,
           "identical": mse == 0.0, "max_abs_diff": finite_or_none(np.abs(ref - got).max()), "image_size": [W, H]}
    if out["psnr_vs_model"] is None:  # files hold no NaN or inf: say why the figure is missing
        out["undefined"] = {"psnr_vs_model": "the PLY re-renders identically to the model (PSNR is infinite)"
                            if mse == 0.0 else f"the renders cannot be compared (mean squared error {mse})"}
    if out["max_abs_diff"] is not None:
        out["max_abs_diff"] = round(out["max_abs_diff"], 5)
    return out


#: every lighting preset's degree-0 SH coefficients, beside splat.ply (the PLY holds one preset baked in)
LIGHTING_FILE = "lighting.npz"


def write_lighting(model, path: Path, baked: int) -> Path:
    """``lighting.npz``: ``presets`` (names), ``baked`` (the one in splat.ply) and ``f_dc`` [P, N, 3] float32,
    each preset's degree-0 SH coefficients (a 3DGS PLY's ``f_dc``) in splat.ply's Gaussian order: swap one in
    for the PLY's ``f_dc`` to see the twin under that preset."""
    import io

    import torch

    from rigs.fileio import atomic_write_bytes

    with torch.no_grad():
        dc = np.stack([model.baked_features_dc(i).detach().cpu().numpy().astype(np.float32)
                       for i in range(len(model.presets))])
    buf = io.BytesIO()
    np.savez(buf, presets=np.asarray(model.presets), baked=np.asarray(model.presets[baked]), f_dc=dc)
    atomic_write_bytes(path, buf.getvalue())
    return path


def export_run(model, run_dir: Path | str, dataset_doc: dict, *, frames: int = 36, check_camera=None,
               on_event: Callable[[dict], None] | None = None) -> dict:
    """Write the splat PLY and the turntable previews of a trained model; returns what was written.

    ``check_camera`` (a nerfstudio Cameras of one held-out view) is where the PLY is re-rendered and
    compared with the model. The twin is the subject's likeness: the consent of the session the
    dataset came from must allow ``train`` today (checked before anything is written).
    """
    require_dataset_consent(dataset_doc)
    emit = on_event or (lambda ev: None)
    run_dir = Path(run_dir)
    lighting = model.config.render_lighting
    params = splat_params(model, lighting)
    preset = model.presets[lighting]
    ply = write_splat_ply(run_dir / "splat.ply", params, comments=[
        f"twinstudio twin-splat, lighting preset baked in: {preset}",
        f"{AI_LABEL}: generated images must be disclosed as AI-made and watermarked",
        "frame: studio world, metres, z up; opacity logit, log scales, rot w x y z, f_rest channel-major",
    ])
    back = read_splat_ply(ply)
    result: dict = {"splat_ply": ply.name, "lighting": preset, "splat": splat_stats(back),
                    "lighting_presets": write_lighting(model, run_dir / LIGHTING_FILE, lighting).name}
    if check_camera is not None:
        result["ply_check"] = check_ply_against_model(model, back, check_camera, lighting)

    meta = dataset_doc["twinstudio"]
    centers = np.array([np.asarray(f["transform_matrix"])[:3, 3] for f in dataset_doc["frames"]])
    vol = meta.get("volume")
    if vol:
        focus = np.array([vol["center"][0], vol["center"][1], vol["height"] / 2.0])
    else:
        focus = np.array([*np.median(params.means[:, :2], axis=0), float(np.median(params.means[:, 2]))])
    radius = float(np.median(np.linalg.norm(centers[:, :2] - focus[:2], axis=1)))
    if not np.isfinite(radius) or radius <= 0:
        raise TrainError("turntable: cannot place the orbit (no camera positions in the dataset)")
    cuda = model.device.type == "cuda"
    w, h = TURNTABLE_SIZE_GPU if cuda else TURNTABLE_SIZE_CPU
    fov = TURNTABLE_FOV_DEG
    if vol:  # the capture volume's height fills the frame, with a little room
        fov = math.degrees(2.0 * math.atan(0.55 * vol["height"] / radius))
    cams = turntable_cameras(focus, radius, 0.0, frames, width=w, height_px=h, fov_deg=fov)

    def render_fn(viewmat, K, width, height):
        return render_splat(back, viewmat, K, width, height, device="cuda" if cuda else "cpu")

    tt = write_turntable(run_dir / "previews", render_fn, cams,
                         on_progress=lambda d, n: emit({"event": "progress", "stage": "turntable", "done": d,
                                                        "total": n}))
    result["turntable"] = {k: (str(Path(v).relative_to(run_dir)) if isinstance(v, (str, Path)) and
                               str(v).startswith(str(run_dir)) else v) for k, v in tt.items()}
    return result


__all__ = ["LIGHTING_FILE", "check_ply_against_model", "export_run", "render_splat", "splat_params",
           "write_lighting"]
