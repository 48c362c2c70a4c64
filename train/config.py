"""The ``twin-splat`` method, registered with nerfstudio through the ``nerfstudio.method_configs`` entry point.

``ns-train twin-splat --data <session>/train/dataset`` trains it with nerfstudio's
own tools; :mod:`train.runner` trains it from Python with twinstudio's dashboard.
Optimiser settings are splatfacto's, with the position learning rate in studio
metres (splatfacto's assumes poses scaled into [-1, 1]; a studio ring has a
radius of about 3 m) and two more groups for the appearance codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from train.method import TwinDataParserConfig, TwinSplatModelConfig

METHOD_NAME = "twin-splat"
STUDIO_SCALE_M = 3.0  # splatfacto's normalised unit in studio metres (ring radius)


@dataclass
class TwinTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig; twinstudio's runner pins the run folder to ``<root>/train/<run>``."""

    run_dir: Optional[Path] = None
    """the run's folder (None: nerfstudio's output_dir/experiment/method/timestamp, as ns-train makes it)"""

    def get_base_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir is not None else super().get_base_dir()


def optimizers(max_steps: int = 30000, colour_lr_scale: float = 1.0) -> dict:
    """splatfacto's optimisers in studio metres; ``colour_lr_scale`` speeds up colour and appearance for
    short runs (a preview of a few hundred steps cannot move a colour far at splatfacto's rates)."""
    def adam(lr: float, final: float | None = None, warmup: int = 0) -> dict:
        sched = (ExponentialDecaySchedulerConfig(lr_final=final, max_steps=max_steps, warmup_steps=warmup,
                                                 lr_pre_warmup=0 if warmup else 1e-8)
                 if final is not None else None)
        return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": sched}

    return {
        "means": adam(1.6e-4 * STUDIO_SCALE_M, 1.6e-6 * STUDIO_SCALE_M),
        "features_dc": adam(0.0025 * colour_lr_scale),
        "features_rest": adam(0.0025 / 20 * colour_lr_scale),
        "opacities": adam(0.05),
        "scales": adam(0.005),
        "quats": adam(0.001),
        "appearance": adam(0.0025 * colour_lr_scale),
        "lighting_embedding": adam(1e-3 * colour_lr_scale),
        "camera_opt": adam(1e-4, 5e-7, warmup=1000),
    }


def twin_splat_config(max_steps: int = 30000) -> TwinTrainerConfig:
    return TwinTrainerConfig(
        method_name=METHOD_NAME,
        steps_per_eval_image=0,
        steps_per_eval_batch=0,
        steps_per_eval_all_images=0,
        steps_per_save=2000,
        max_num_iterations=max_steps,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(
            datamanager=FullImageDatamanagerConfig(dataparser=TwinDataParserConfig(), cache_images_type="uint8"),
            model=TwinSplatModelConfig(),
        ),
        optimizers=optimizers(max_steps),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


twin_splat = MethodSpecification(
    config=twin_splat_config(),
    description="twinstudio's splatfacto for studio captures of a person: masks as alpha, an appearance code "
                "per lighting preset, studio metres, CPU-capable, no downloads",
)

__all__ = ["METHOD_NAME", "TwinTrainerConfig", "optimizers", "twin_splat", "twin_splat_config"]
