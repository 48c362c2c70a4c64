"""The ``twin-splat`` method, registered with nerfstudio through the ``nerfstudio.method_configs`` entry point.

``ns-train twin-splat --data <session>/train/dataset`` trains it with nerfstudio's
own tools; :mod:`train.runner` trains it from Python with twinstudio's dashboard.
Optimiser settings are splatfacto's, with the position learning rate in studio
metres (splatfacto's assumes poses scaled into [-1, 1]; a studio ring has a
radius of about 3 m) and two more groups for the appearance codes.

A run folder may come from elsewhere, so reading one runs no code:
:func:`read_run_config` reads ``config.yml`` with a YAML loader that builds
only nerfstudio's and twinstudio's config classes (and paths, tuples, their
enums), and :func:`load_checkpoint` loads a checkpoint with
``weights_only=True``, allowing for that one call only the few numpy globals
nerfstudio's checkpoints hold.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import pathlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from train.dataset import TrainError
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


def optimizers(max_steps: int = 30000, colour_lr_scale: float = 1.0, geometry_lr_scale: float = 1.0,
               settle: float | None = None, settle_shape: bool = False) -> dict:
    """splatfacto's optimisers in studio metres. For short runs (a preview of a few thousand steps cannot
    move a colour or a Gaussian far at splatfacto's rates) ``colour_lr_scale`` speeds up colour and
    appearance, ``geometry_lr_scale`` the means (x it) and scales (x its square root), and ``settle``
    decays the colour, appearance and opacity rates (with ``settle_shape`` also scales and rotations)
    exponentially to that fraction by the last step, so the fast rates do not leave the end noisy."""
    def settled(lr: float, on: bool = True) -> dict:
        return adam(lr, lr * settle if settle and on else None)

    def adam(lr: float, final: float | None = None, warmup: int = 0) -> dict:
        sched = (ExponentialDecaySchedulerConfig(lr_final=final, max_steps=max_steps, warmup_steps=warmup,
                                                 lr_pre_warmup=0 if warmup else 1e-8)
                 if final is not None else None)
        return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": sched}

    return {
        "means": adam(1.6e-4 * STUDIO_SCALE_M * geometry_lr_scale, 1.6e-6 * STUDIO_SCALE_M * geometry_lr_scale),
        "features_dc": settled(0.0025 * colour_lr_scale),
        "features_rest": settled(0.0025 / 20 * colour_lr_scale),
        "opacities": settled(0.05),
        "scales": settled(0.005 * geometry_lr_scale ** 0.5, settle_shape),
        "quats": settled(0.001, settle_shape),
        "appearance": settled(0.0025 * colour_lr_scale),
        "lighting_embedding": settled(1e-3 * colour_lr_scale),
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

# ----------------------------------------------------------------------------- reading a run folder safely

#: modules whose config dataclasses, enums and classes a run's config.yml may name
CONFIG_MODULES = ("nerfstudio", "train")
#: ... and where its classes named by reference (``_target``, optimisers) may also live
CLASS_MODULES = (*CONFIG_MODULES, "torch.optim")
#: functions (not classes) a config may name: nerfstudio's data managers' ``collate_fn``
CONFIG_FUNCTIONS = ("nerfstudio.data.utils.nerfstudio_collate.nerfstudio_collate",)
_PATHS = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
          pathlib.PureWindowsPath)
_PY = "tag:yaml.org,2002:python/"


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _resolve(name: str, prefixes: tuple[str, ...], node) -> Any:
    """The object ``module.attr`` names, importing ``module`` only when it lies under ``prefixes``."""
    module, _, attr = name.rpartition(".")
    if not module or not _in(module, prefixes):
        raise yaml.constructor.ConstructorError(None, None, f"refused {name!r}: only names from "
                                                f"{', '.join(prefixes)} are read", node.start_mark)
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise yaml.constructor.ConstructorError(None, None, f"cannot find {name!r}: {e}", node.start_mark) from e
    if not _in(getattr(obj, "__module__", "") or "", prefixes):  # a name re-exported from elsewhere (os.system)
        raise yaml.constructor.ConstructorError(None, None, f"refused {name!r}: defined in {obj.__module__!r}",
                                                node.start_mark)
    return obj


class RunConfigLoader(yaml.SafeLoader):
    """YAML's safe loader plus the few python tags nerfstudio's ``config.yml`` uses, each restricted:

    - ``!!python/object:C`` only for dataclasses of nerfstudio / twinstudio (built without calling
      anything: ``C.__new__`` and the mapping as the instance's fields);
    - ``!!python/name:X`` only for classes of nerfstudio, twinstudio or ``torch.optim`` (and
      nerfstudio's collate function), which nerfstudio later instantiates;
    - ``!!python/object/apply:F`` only for pathlib paths, nerfstudio's / twinstudio's enums and
      ``operator.getitem`` of such classes (a generic data manager);
    - ``!!python/tuple``.

    Every other python tag (``object/apply:os.system``, ``object/new``, ``module``, ...) is refused.
    """


def _construct_object(loader: RunConfigLoader, suffix: str, node):
    cls = _resolve(suffix, CONFIG_MODULES, node)
    if not (inspect.isclass(cls) and dataclasses.is_dataclass(cls)):
        raise yaml.constructor.ConstructorError(None, None, f"refused {suffix!r}: not a config dataclass",
                                                node.start_mark)
    obj = cls.__new__(cls)
    yield obj
    state = loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in state if k not in fields)
    if unknown:
        raise yaml.constructor.ConstructorError(None, None, f"refused {suffix}: no field(s) {', '.join(unknown)}",
                                                node.start_mark)
    for name, f in fields.items():  # every field set: the file's value where it has one, else the default
        default = _field_default(f)
        if name not in state:
            if default is not dataclasses.MISSING:
                obj.__dict__[name] = default
            continue
        value = state[name]
        # what nerfstudio will build from the config must be of the kind the class expects: a ``_target`` a
        # subclass of the default one, a nested config an instance of the default's class (or a subclass)
        if name == "_target" and inspect.isclass(default):
            target = getattr(value, "__origin__", value)  # a generic class (operator.getitem) counts as its origin
            ok = inspect.isclass(target) and issubclass(target, _family_target(cls, default))
        elif dataclasses.is_dataclass(default) and not inspect.isclass(default):
            ok = isinstance(value, _config_base(type(default)))
        else:
            ok = True
        if not ok:
            raise yaml.constructor.ConstructorError(None, None, f"refused {suffix}.{name}: {value!r} is not what "
                                                    f"{cls.__name__} expects there", node.start_mark)
        obj.__dict__[name] = value


def _family_target(cls: type, default: type) -> type:
    """The most general ``_target`` class of ``cls``'s config family (a model config may build any Model)."""
    f = next((f for f in dataclasses.fields(_config_base(cls)) if f.name == "_target"), None)
    base = _field_default(f) if f is not None else None
    return base if inspect.isclass(base) and issubclass(default, base) else default


def _field_default(f: dataclasses.Field):
    """A dataclass field's default value (its factory called), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _config_base(cls: type) -> type:
    """The most general config class of ``cls``'s family: the last nerfstudio/twinstudio dataclass among its
    bases that is not nerfstudio's generic ``InstantiateConfig``/``PrintableConfig`` (a pipeline config's
    ``model`` may be any ModelConfig, not only the default's class)."""
    generic = {"InstantiateConfig", "PrintableConfig"}
    family = [c for c in cls.__mro__ if dataclasses.is_dataclass(c) and _in(c.__module__, CONFIG_MODULES)
              and c.__name__ not in generic]
    return family[-1] if family else cls


def _construct_name(loader: RunConfigLoader, suffix: str, node):
    if suffix in CONFIG_FUNCTIONS:
        return _resolve(suffix, CONFIG_MODULES, node)
    obj = _resolve(suffix, CLASS_MODULES, node)
    if not inspect.isclass(obj):
        raise yaml.constructor.ConstructorError(None, None, f"refused {suffix!r}: not a class", node.start_mark)
    return obj


def _construct_apply(loader: RunConfigLoader, suffix: str, node):
    if isinstance(node, yaml.SequenceNode):
        args, kwds = loader.construct_sequence(node, deep=True), {}
    else:
        value = loader.construct_mapping(node, deep=True)
        extra = set(value) - {"args", "kwds"}
        if extra:
            raise yaml.constructor.ConstructorError(None, None, f"refused {suffix!r} with {sorted(extra)}",
                                                    node.start_mark)
        args, kwds = list(value.get("args", [])), dict(value.get("kwds", {}))
    if suffix == "_operator.getitem":
        if kwds or len(args) != 2 or not all(inspect.isclass(a) for a in args):
            raise yaml.constructor.ConstructorError(None, None, "refused operator.getitem of anything but two "
                                                    "classes", node.start_mark)
        return args[0][args[1]]
    if suffix.startswith("pathlib."):
        fn = getattr(pathlib, suffix.partition(".")[2], None)
        if fn not in _PATHS or kwds or not all(isinstance(a, str) for a in args):
            raise yaml.constructor.ConstructorError(None, None, f"refused {suffix!r}", node.start_mark)
        return fn(*args)
    fn = _resolve(suffix, CONFIG_MODULES, node)
    if not (inspect.isclass(fn) and issubclass(fn, enum.Enum)) or kwds or len(args) != 1:
        raise yaml.constructor.ConstructorError(None, None, f"refused {suffix!r}: only paths and enums are "
                                                "built", node.start_mark)
    return fn(args[0])


def _refuse(loader: RunConfigLoader, suffix: str, node):
    raise yaml.constructor.ConstructorError(None, None, f"refused the tag {node.tag!r}", node.start_mark)


RunConfigLoader.add_multi_constructor(_PY + "object:", _construct_object)
RunConfigLoader.add_multi_constructor(_PY + "name:", _construct_name)
RunConfigLoader.add_multi_constructor(_PY + "object/apply:", _construct_apply)
RunConfigLoader.add_constructor(_PY + "tuple", lambda loader, node: tuple(loader.construct_sequence(node)))
RunConfigLoader.add_multi_constructor(_PY, _refuse)
RunConfigLoader.add_multi_constructor("!", _refuse)


def read_run_config(path: Path | str) -> TrainerConfig:
    """A run's ``config.yml`` (nerfstudio's TrainerConfig) read with :class:`RunConfigLoader`: runs no code.

    Raises TrainError (exit 2) naming the file and the refused tag for anything else.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TrainError(f"{p} does not exist: not a training run", path=str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{p}: cannot read: {e}", path=str(p)) from e
    try:
        cfg = yaml.load(text, Loader=RunConfigLoader)  # noqa: S506 - RunConfigLoader is restricted, see above
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise TrainError(f"{p}{where}: not read: {what} (a run config may hold only nerfstudio's and "
                         "twinstudio's settings)", path=str(p)) from e
    except RecursionError:
        raise TrainError(f"{p}: nested too deeply to read", path=str(p)) from None
    except (ValueError, TypeError, KeyError) as e:  # an enum value it lacks, a generic of a non-generic class, ...
        raise TrainError(f"{p}: not read: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                         path=str(p)) from e
    if not isinstance(cfg, TrainerConfig):
        raise TrainError(f"{p}: not a nerfstudio run config (got {type(cfg).__name__})", path=str(p))
    return cfg


def checkpoint_globals() -> list:
    """What nerfstudio's checkpoints hold beyond tensors: numpy scalars (a learning rate saved as
    ``numpy.float64``) with their dtypes, under numpy 1's and numpy 2's module names."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8,
                                          np.bool_)}
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *sorted(dtypes, key=lambda t: t.__name__)]


def load_checkpoint(path: Path | str) -> dict:
    """A nerfstudio checkpoint loaded with ``weights_only=True`` (tensors, containers and
    :func:`checkpoint_globals` only, allowed for this call): a crafted pickle raises TrainError (exit 2)."""
    import pickle

    import torch

    p = Path(path)
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = " ".join(str(e).split())
        m = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", why)
        why = (m.group(1) if m else why[:300]).split(". Please use")[0].split(" Please use")[0]
        raise TrainError(f"{p}: refused: a checkpoint may hold only tensors and plain values ({why})",
                         path=str(p)) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise TrainError(f"{p}: not a readable checkpoint: {e}", path=str(p)) from e
    if not isinstance(state, dict) or not {"step", "pipeline"} <= set(state):
        raise TrainError(f"{p}: not a nerfstudio checkpoint (no step and pipeline)", path=str(p))
    return state


__all__ = ["METHOD_NAME", "RunConfigLoader", "TwinTrainerConfig", "checkpoint_globals", "load_checkpoint",
           "optimizers", "read_run_config", "twin_splat", "twin_splat_config"]
