"""twin-splat: nerfstudio's splatfacto made for a person captured in a studio.

What it changes, and why:

- **Mask-aware**: each training step composites the ground truth onto the same
  random background the render is composited on, using the subject mask as
  alpha ("transparency carving"); the loss covers the whole image, and the
  rendered opacity is pulled towards the mask. Masking only the loss (what
  stock splatfacto does with ``mask_path``) leaves floaters around the subject.
- **An appearance code per lighting preset**: the studio photographs the same
  pose under several lighting presets. Each preset has an embedding ``e_p``
  (``appearance_dim``), each Gaussian a small matrix ``F_i`` (``appearance_dim
  x 3``); the Gaussian's base colour (SH degree 0) is offset by ``e_p F_i`` in
  the preset's images. Exports bake one preset (``render_lighting``) in.
- **Studio frame**: the dataparser keeps the studio's metres and z-up axes (no
  re-orientation, no rescaling), so the splat lands on the mesh and cameras.
- **Runs on the CPU**: without CUDA the rasteriser is :mod:`train.raster`
  (gsplat's kernels are CUDA-only); nothing calls ``.cuda()`` unasked and
  images are cached on the training device without pinned memory.
- **Nothing downloads**: LPIPS (AlexNet weights) is built only when the weights
  are already on disk (``lpips="auto"``); otherwise it reports NaN.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Type, Union

import torch
from gsplat.strategy import DefaultStrategy
from pytorch_msssim import SSIM
from torch.nn import Parameter

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio, NerfstudioDataParserConfig
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig, num_sh_bases

from train.dataset import TrainError, read_dataset

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # what torchvision's AlexNet (inside torchmetrics' LPIPS) loads


# ----------------------------------------------------------------------------- dataparser


@dataclass
class TwinDataParserConfig(NerfstudioDataParserConfig):
    """nerfstudio-data, kept in the studio's frame, with the lighting preset of every image."""

    _target: Type = field(default_factory=lambda: TwinDataParser)
    orientation_method: Literal["pca", "up", "vertical", "none"] = "none"
    center_method: Literal["poses", "focus", "none"] = "none"
    auto_scale_poses: bool = False
    load_3D_points: bool = True
    downscale_factor: Optional[int] = 1


class TwinDataParser(Nerfstudio):
    """Adds ``lighting`` (preset index) to every camera's metadata and the capture volume as scene box."""

    config: TwinDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train"):
        out = super()._generate_dataparser_outputs(split)
        doc = read_dataset(self.config.data)
        meta = doc["twinstudio"]
        by_name = {Path(f["file_path"]).name: f for f in doc["frames"]}
        try:
            lighting = [by_name[Path(p).name]["lighting_index"] for p in out.image_filenames]
        except KeyError as e:
            raise TrainError(f"{self.config.data}: frame {e} has no lighting_index", path=str(self.config.data)) from e
        c = out.cameras
        out.cameras = Cameras(
            camera_to_worlds=c.camera_to_worlds, fx=c.fx, fy=c.fy, cx=c.cx, cy=c.cy,
            width=c.width, height=c.height, distortion_params=c.distortion_params,
            camera_type=c.camera_type, times=c.times,
            metadata={**(c.metadata or {}), "lighting": torch.tensor(lighting, dtype=torch.long)[:, None]},
        )
        out.metadata["presets"] = list(meta["presets"])
        centers = c.camera_to_worlds[:, :3, 3]
        out.metadata["scene_scale"] = float(centers.abs().max())
        vol = meta.get("volume")
        if vol:
            cx, cy = vol["center"]
            r, h = vol["radius"], vol["height"]
            out.scene_box = SceneBox(aabb=torch.tensor([[cx - r, cy - r, 0.0], [cx + r, cy + r, h]]))
        return out


# ----------------------------------------------------------------------------- LPIPS


def lpips_weights_present() -> bool:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    return (hub / ALEXNET_WEIGHTS).is_file()


class OptionalLPIPS(torch.nn.Module):
    """torchmetrics' LPIPS when its AlexNet weights are on disk, else a metric that answers NaN."""

    def __init__(self, mode: Literal["auto", "on", "off"] = "auto") -> None:
        super().__init__()
        use = mode == "on" or (mode == "auto" and lpips_weights_present())
        if mode == "on" and not lpips_weights_present():
            raise TrainError(f"lpips='on' needs {ALEXNET_WEIGHTS} in $TORCH_HOME/hub/checkpoints (nothing is "
                             "downloaded at run time); use lpips='auto' or 'off'")
        self.metric = None
        if use:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.metric = LearnedPerceptualImagePatchSimilarity(normalize=True)

    @property
    def available(self) -> bool:
        return self.metric is not None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.metric is None:
            return torch.tensor(float("nan"))
        return self.metric(a, b)


# ----------------------------------------------------------------------------- model


@dataclass
class TwinSplatModelConfig(SplatfactoModelConfig):
    """splatfacto + masks as alpha + an appearance code per lighting preset; CPU-capable."""

    _target: Type = field(default_factory=lambda: TwinSplatModel)
    appearance_dim: int = 8
    """size of the per-preset appearance code (0: one appearance for every preset)"""
    appearance_reg: float = 1e-3
    """weight of the L2 penalty on the per-preset colour offsets (keeps the base colour meaningful)"""
    alpha_loss_weight: float = 0.05
    """weight of the L1 loss between the rendered opacity and the subject mask"""
    render_lighting: int = 0
    """preset index used where a camera has none (viewer, turntable, exports)"""
    lpips: Literal["auto", "on", "off"] = "auto"
    """LPIPS only where its AlexNet weights are already on disk ("auto"); never downloaded"""
    init_opacity: float = 0.1
    """opacity of the Gaussians at the start (splatfacto: 0.1)"""
    refine_pause_after_reset: Optional[int] = None
    """steps without refinement after an opacity reset (None: splatfacto's, the training images + refine_every);
    gsplat also applies it from step 0, which would stop a short run from ever refining"""
    num_random: int = 20000
    """Gaussians placed at random in the capture volume when the dataset has no seed points"""
    background_color: Literal["random", "black", "white"] = "random"


def _viewmat(c2w: torch.Tensor) -> torch.Tensor:
    """World-to-camera (OpenCV axes) from nerfstudio's camera-to-world (OpenGL axes); [C,4,4]."""
    R = c2w[:, :3, :3] * torch.tensor([[[1.0, -1.0, -1.0]]], device=c2w.device, dtype=c2w.dtype)
    T = c2w[:, :3, 3:4]
    R_inv = R.transpose(1, 2)
    vm = torch.zeros(c2w.shape[0], 4, 4, device=c2w.device, dtype=c2w.dtype)
    vm[:, :3, :3] = R_inv
    vm[:, :3, 3:4] = -R_inv @ T
    vm[:, 3, 3] = 1.0
    return vm


class TwinSplatModel(SplatfactoModel):
    config: TwinSplatModelConfig

    def populate_modules(self):
        cfg = self.config
        meta = self.kwargs.get("metadata") or {}
        self.presets: list[str] = list(meta.get("presets") or ["default"])
        self.scene_scale = float(meta.get("scene_scale") or 1.0)
        if self.seed_points is not None and not cfg.random_init and len(self.seed_points[0]) > 0:
            means = self.seed_points[0].float()
            rgb = self.seed_points[1].float() / 255.0
        else:
            lo, hi = self.scene_box.aabb[0], self.scene_box.aabb[1]
            g = torch.Generator().manual_seed(0)
            means = lo + (hi - lo) * torch.rand((cfg.num_random, 3), generator=g)
            rgb = torch.rand((cfg.num_random, 3), generator=g)
        n = means.shape[0]
        dist, _ = self.k_nearest_sklearn(means, 3)
        avg = torch.from_numpy(dist).mean(dim=-1, keepdim=True).clamp_min(1e-4)
        dim_sh = num_sh_bases(cfg.sh_degree)
        g = torch.Generator().manual_seed(1)
        u = torch.rand((n, 3), generator=g)  # uniformly random rotations
        quats = torch.stack([torch.sqrt(1 - u[:, 0]) * torch.sin(2 * math.pi * u[:, 1]),
                             torch.sqrt(1 - u[:, 0]) * torch.cos(2 * math.pi * u[:, 1]),
                             torch.sqrt(u[:, 0]) * torch.sin(2 * math.pi * u[:, 2]),
                             torch.sqrt(u[:, 0]) * torch.cos(2 * math.pi * u[:, 2])], dim=-1)
        dc = RGB2SH(rgb) if cfg.sh_degree > 0 else torch.logit(rgb, eps=1e-6)
        a = max(cfg.appearance_dim, 0)
        self.gauss_params = torch.nn.ParameterDict({
            "means": Parameter(means),
            "scales": Parameter(torch.log(avg.repeat(1, 3))),
            "quats": Parameter(quats),
            "features_dc": Parameter(dc),
            "features_rest": Parameter(torch.zeros((n, dim_sh - 1, 3))),
            "opacities": Parameter(torch.logit(cfg.init_opacity * torch.ones(n, 1))),
            "appearance": Parameter(torch.zeros((n, a, 3))),
        })
        self.lighting_embedding = torch.nn.Embedding(len(self.presets), a)
        torch.nn.init.normal_(self.lighting_embedding.weight, std=1.0, generator=torch.Generator().manual_seed(2))
        self.camera_optimizer = cfg.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")

        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        self.lpips = OptionalLPIPS(cfg.lpips)
        self.step = 0
        self.crop_box = None
        self.background_color = (torch.tensor([0.1490, 0.1647, 0.2157]) if cfg.background_color == "random"
                                 else self._fixed_background())
        if cfg.use_bilateral_grid:
            raise TrainError("twin-splat has no bilateral grid: lighting is handled by the appearance codes")
        self.strategy = DefaultStrategy(
            prune_opa=cfg.cull_alpha_thresh, grow_grad2d=cfg.densify_grad_thresh,
            grow_scale3d=cfg.densify_size_thresh, grow_scale2d=cfg.split_screen_size,
            prune_scale3d=cfg.cull_scale_thresh, prune_scale2d=cfg.cull_screen_size,
            refine_scale2d_stop_iter=cfg.stop_screen_size_at, refine_start_iter=cfg.warmup_length,
            refine_stop_iter=cfg.stop_split_at, reset_every=cfg.reset_alpha_every * cfg.refine_every,
            refine_every=cfg.refine_every,
            pause_refine_after_reset=(self.num_train_data + cfg.refine_every if cfg.refine_pause_after_reset is None
                                      else cfg.refine_pause_after_reset),
            absgrad=cfg.use_absgrad, revised_opacity=False, verbose=False,
        )
        # thresholds in splatfacto's units (poses scaled into [-1, 1]) become studio metres
        self.strategy_state = self.strategy.initialize_state(scene_scale=self.scene_scale)

    def _fixed_background(self) -> torch.Tensor:
        return torch.ones(3) if self.config.background_color == "white" else torch.zeros(3)

    # -- parameters

    def get_gaussian_param_groups(self) -> Dict[str, list[Parameter]]:
        names = ["means", "scales", "quats", "features_dc", "features_rest", "opacities", "appearance"]
        return {name: [self.gauss_params[name]] for name in names}

    def get_param_groups(self) -> Dict[str, list[Parameter]]:
        gps = self.get_gaussian_param_groups()
        gps["lighting_embedding"] = list(self.lighting_embedding.parameters())
        self.camera_optimizer.get_param_groups(param_groups=gps)
        return gps

    # -- appearance

    def lighting_of(self, camera: Cameras) -> int:
        """The preset index of a camera (``render_lighting`` when it has none)."""
        md = camera.metadata or {}
        if "lighting" in md:
            return int(torch.as_tensor(md["lighting"]).reshape(-1)[0])
        return self.config.render_lighting

    def colour_offset(self, lighting: int) -> torch.Tensor:
        """Per-Gaussian offset of the SH degree-0 coefficient under a preset; [N,3]."""
        if self.config.appearance_dim <= 0:
            return torch.zeros_like(self.features_dc)
        if not 0 <= lighting < len(self.presets):
            raise TrainError(f"lighting preset index {lighting} is not among the {len(self.presets)} presets "
                             f"({', '.join(self.presets)})")
        e = self.lighting_embedding.weight[lighting]
        return torch.einsum("nac,a->nc", self.gauss_params["appearance"], e)

    def baked_features_dc(self, lighting: int | None = None) -> torch.Tensor:
        """The degree-0 SH coefficients with a preset's appearance baked in, for exports: a 3DGS PLY's
        ``f_dc`` (colour = 0.5 + C0 f_dc). A model of SH degree 0 holds the logit of its colour instead
        (splatfacto's convention there), which is converted."""
        dc = self.features_dc + self.colour_offset(self.config.render_lighting if lighting is None else lighting)
        if self.config.sh_degree == 0:
            dc = RGB2SH(torch.sigmoid(dc))
        return dc

    # -- rendering

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, list]]:
        if not isinstance(camera, Cameras):
            raise TrainError("twin-splat renders Cameras only")
        if self.training:
            if camera.shape[0] != 1:
                raise TrainError("twin-splat trains on one camera at a time")
            c2w = self.camera_optimizer.apply_to_camera(camera)
        else:
            c2w = camera.camera_to_worlds
        lighting = self.lighting_of(camera)
        offset = self.colour_offset(lighting)
        if self.training and self.config.appearance_reg > 0:
            self._offset_penalty = offset.pow(2).mean()
        colors = torch.cat(((self.features_dc + offset)[:, None, :], self.features_rest), dim=1)

        d = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / d)
        K = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(d)
        self.last_size = (H, W)
        viewmat = _viewmat(c2w.to(self.device))
        render_mode = "RGB+ED" if (self.config.output_depth_during_training or not self.training) else "RGB"
        if self.config.sh_degree > 0:
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colors = torch.sigmoid(colors).squeeze(1)
            sh_degree = None
        common = dict(means=self.means, quats=self.quats, scales=torch.exp(self.scales),
                      opacities=torch.sigmoid(self.opacities).squeeze(-1), colors=colors, viewmats=viewmat,
                      Ks=K, width=W, height=H, near_plane=0.01, far_plane=1e10, render_mode=render_mode,
                      sh_degree=sh_degree)
        if self.device.type != "cuda" and self.strategy.absgrad and self.training:
            raise TrainError("the CPU rasteriser gives plain gradients: train with use_absgrad=False on CPU")
        from train.raster import rasterize_on_device

        render, alpha, self.info = rasterize_on_device(
            **common, gsplat_options=dict(packed=False, sparse_grad=False, absgrad=self.strategy.absgrad,
                                          rasterize_mode=self.config.rasterize_mode))
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state,
                                            self.step, self.info)
        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        depth = None
        if render_mode == "RGB+ED":
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        if not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    # -- losses and metrics

    def _mask(self, batch: dict, shape: Tuple[int, int]) -> torch.Tensor | None:
        if "mask" not in batch:
            return None
        m = self._downscale_if_required(batch["mask"].to(torch.float32)).to(self.device)
        if tuple(m.shape[:2]) != tuple(shape):
            raise TrainError(f"mask is {tuple(m.shape[:2])}, image is {tuple(shape)}")
        return m

    def masked_gt(self, batch: dict, background: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
        """The ground truth composited onto ``background``, and the alpha it was composited with.

        An RGBA image (the export's unmixed subject: foreground colour and soft alpha) brings its own
        alpha; an RGB image is composited with the subject mask.
        """
        img = self.get_gt_img(batch["image"])
        gt = img[..., :3]
        if img.shape[-1] == 4:
            mask = img[..., 3:4]
        else:
            mask = self._mask(batch, gt.shape[:2])
        if mask is not None:
            gt = gt * mask + background * (1 - mask)
        return gt, mask

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        gt, _ = self.masked_gt(batch, outputs["background"])
        return {"psnr": self.psnr(outputs["rgb"], gt), "gaussian_count": self.num_points}

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        gt, mask = self.masked_gt(batch, outputs["background"])
        pred = outputs["rgb"]
        l1 = torch.abs(gt - pred).mean()
        sim = 1 - self.ssim(gt.permute(2, 0, 1)[None], pred.permute(2, 0, 1)[None])
        losses = {"main_loss": (1 - self.config.ssim_lambda) * l1 + self.config.ssim_lambda * sim}
        if mask is not None and self.config.alpha_loss_weight > 0:
            losses["alpha_loss"] = self.config.alpha_loss_weight * torch.abs(outputs["accumulation"] - mask).mean()
        if self.training and self.config.appearance_reg > 0 and hasattr(self, "_offset_penalty"):
            losses["appearance_reg"] = self.config.appearance_reg * self._offset_penalty
        if self.config.use_scale_regularization and self.step % 10 == 0:
            s = torch.exp(self.scales)
            ratio = torch.maximum(s.amax(dim=-1) / s.amin(dim=-1), torch.tensor(self.config.max_gauss_ratio))
            losses["scale_reg"] = 0.1 * (ratio - self.config.max_gauss_ratio).mean()
        if self.training:
            self.camera_optimizer.get_loss_dict(losses)
        return losses

    def get_image_metrics_and_images(self, outputs, batch) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt, mask = self.masked_gt(batch, outputs["background"][0, 0] if outputs["background"].dim() == 3
                                  else outputs["background"])
        pred = outputs["rgb"]
        a, b = gt.permute(2, 0, 1)[None], pred.permute(2, 0, 1)[None]
        metrics = {"psnr": float(self.psnr(a, b).item()), "ssim": float(self.ssim(a, b)),
                   "lpips": float(self.lpips(a, b))}
        if mask is not None and mask.sum() > 0:
            # the person alone: the full-image figure is flattered by the background the twin never learns
            sel = mask[..., 0] > 0.5
            mse = ((gt - pred)[sel] ** 2).mean().clamp_min(1e-10)
            metrics["psnr_subject"] = float(-10 * torch.log10(mse))
        err = (gt - pred).abs().mean(dim=-1, keepdim=True).clamp(0, 1).expand_as(gt)
        images = {"img": torch.cat([gt, pred, err], dim=1), "gt": gt, "rgb": pred}
        if mask is not None:
            images["alpha"] = mask[..., 0]
        return metrics, images


__all__ = ["OptionalLPIPS", "TwinDataParser", "TwinDataParserConfig", "TwinSplatModel", "TwinSplatModelConfig",
           "lpips_weights_present"]
