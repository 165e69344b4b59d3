"""Two experts of one denoising (Wan 2.2 A14B): a high-noise transformer for the noise levels σ >= a boundary and a
low-noise one below it, as WanPipeline / WanImageToVideoPipeline run ``transformer`` and ``transformer_2`` with
``boundary_ratio``. A run trains one of them (diffusion.sigma_min / sigma_max: [boundary, 1] or [0, boundary]);
``dit sample --expert OTHER`` samples with both. OTHER is a run or checkpoint of ours whose range meets this one's at
the boundary, or a local diffusers transformer folder of the same family (e.g. the Diffusers download's
transformer_2/), which then serves the rest of the range.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dit.config import ConfigError
from dit.diffusion.flow import FLOW_TIMESTEPS
from dit.diffusion.samplers import DenoiseFn

if TYPE_CHECKING:
    from dit.distributed.setup import DistEnv


@dataclass
class Experts:
    other: nn.Module  # the expert not in the checkpoint sampled
    boundary: float  # σ at which the high-noise expert hands over to the low-noise one
    other_high: bool  # whether ``other`` serves σ >= boundary


def one_expert(diffusion: Any) -> bool:
    """Whether a run of these diffusion settings trains one expert of two (diffusion.sigma_min / sigma_max)."""
    return diffusion.sigma_min > 0.0 or diffusion.sigma_max < 1.0


def expert_range(config: dict[str, Any]) -> tuple[float, float]:
    """[sigma_min, sigma_max] a checkpoint was trained on (its config.json)."""
    diffusion = config["experiment"]["diffusion"]
    return float(diffusion.get("sigma_min", 0.0)), float(diffusion.get("sigma_max", 1.0))


def split_of(config: dict[str, Any]) -> tuple[float, bool]:
    """(boundary, whether this checkpoint is the low-noise expert) of a checkpoint trained as one expert."""
    lo, hi = expert_range(config)
    if lo == 0.0 and hi == 1.0:
        raise ConfigError("--expert: this checkpoint was trained on every noise level, not as one expert; train each "
                          "expert on its range (diffusion.sigma_min=B for the high-noise one, diffusion.sigma_max=B "
                          "for the low-noise one)")
    if lo > 0.0 and hi < 1.0:
        raise ConfigError(f"--expert: this checkpoint was trained on noise levels [{lo}, {hi}]; two experts split "
                          "[0, 1] at one boundary: [B, 1] and [0, B]")
    return (hi, True) if lo == 0.0 else (lo, False)


def load_expert(config: dict[str, Any], path: str | Path, device: str | torch.device, fp8: bool = False,
                dtype: torch.dtype = torch.float32, env: DistEnv | None = None) -> Experts:
    """The other expert for a checkpoint of ``config`` (its config.json), from ``path``: a run or checkpoint of ours,
    or a diffusers transformer folder; checked to fit the checkpoint's model before its weights load. ``dtype``: its
    weights' (bf16 for samples drawn under bf16 autocast: half the memory). ``env``: the processes of a run, which
    hold its weights on the CPU once per node (dit/distributed/node_shared.py; all ranks call this)."""
    experts = _other_expert(config, path, device=device, fp8=fp8, dtype=dtype, env=env)
    assert experts is not None
    return experts


def check_expert(config: dict[str, Any], path: str | Path) -> None:
    """What ``load_expert`` checks (the ranges meet, the shapes fit), from the config files alone: no weights load."""
    _other_expert(config, path)


def _other_expert(config: dict[str, Any], path: str | Path, *, device: str | torch.device | None = None,
                  fp8: bool = False, dtype: torch.dtype = torch.float32,
                  env: DistEnv | None = None) -> Experts | None:
    """The other expert, checked; ``device`` None: only checked (its model built without weights), None."""
    from accelerate import init_empty_weights

    from dit.models.families import FAMILIES, denoiser_from_config, held_weights

    boundary, we_are_low = split_of(config)
    family = config["dit"].get("family", "dit")
    folder = Path(path)
    diffusers = _diffusers_folder(folder)
    if diffusers:
        from dit.models.diffusers_folder import read_diffusers_folder

        if family not in FAMILIES:
            raise ConfigError(f"--expert {path}: a diffusers folder, but this checkpoint's model is our DiT")
        cls = FAMILIES[family]
        read_diffusers_folder(folder, key="--expert", class_name=cls.class_name, subfolder="transformer_2",
                              family_key="model.family", family=family,
                              family_of_class={c.class_name: f for f, c in FAMILIES.items()})
        options = {k: config["dit"][k] for k in cls.option_keys if k in config["dit"]}
        with init_empty_weights():  # (its config; the weights load below)
            other_config = cls(cls.transformer_class().from_config(cls.transformer_class().load_config(folder)),
                               **options).config
    else:
        from dit.export import resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        other = json.loads((ckpt / "config.json").read_text())
        lo, hi = expert_range(other)
        want = (boundary, 1.0) if we_are_low else (0.0, boundary)
        if (lo, hi) != want:
            raise ConfigError(f"--expert {path}: trained on noise levels [{lo}, {hi}], but the other expert of this "
                              f"checkpoint serves [{want[0]}, {want[1]}] (the boundary {boundary} of this one's range)")
        other_config = other["dit"]
    ours = config["dit"]
    fits = {"in_channels": (other_config.get("in_channels"), ours.get("in_channels")),
            "text_dim": (other_config.get("text_dim"), ours.get("text_dim")),
            "patch_size": (list(other_config.get("patch_size", [])), list(ours.get("patch_size", []))),
            "condition_channels": (other_config.get("condition_channels", 0), ours.get("condition_channels", 0))}
    differ = {k: v for k, v in fits.items() if v[0] != v[1]}
    if other_config.get("family", "dit") != family or differ:
        listed = ", ".join(f"{k} {a} (expert) vs {b} (checkpoint)" for k, (a, b) in differ.items())
        raise ConfigError(f"--expert {path} is not the other expert of this checkpoint's {family} model: "
                          f"{listed or 'another family'}")
    if device is None:
        return None

    def weights() -> dict[str, torch.Tensor]:
        if diffusers:  # (diffusers' own dtype rules: _keep_in_fp32_modules)
            return cls(cls.transformer_class().from_pretrained(folder, torch_dtype=dtype), **options).state_dict()
        from dit.weights import checkpoint_weights

        return held_weights(checkpoint_weights(ckpt)[0], family, dtype)

    from dit.distributed.node_shared import node_shared_state

    state = node_shared_state(weights, env, "expert") if env is not None else weights()
    model = denoiser_from_config(other_config, state)
    model.eval().requires_grad_(False)
    if fp8:  # (on the CPU, before it moves: the device never holds its full-width weights)
        from dit.models.fp8 import frozen_block_linears_to_fp8

        frozen_block_linears_to_fp8(model)
    return Experts(model.to(device), boundary, other_high=we_are_low)


def _diffusers_folder(folder: Path) -> bool:
    """Whether ``folder`` is a diffusers model folder (its config.json names a class), not a run or checkpoint."""
    try:
        return "_class_name" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


@contextmanager
def expert_on(experts: Experts | None, device: torch.device) -> Iterator[None]:
    """The other expert on ``device`` while it samples; after, its tensors are the CPU ones it held before (where a
    training run holds it, maybe mapped once per node): the device copies are dropped, not copied back."""
    if experts is None:
        yield
        return
    held = [(m, kind, key, t, t.data) for m in experts.other.modules() for kind in ("_parameters", "_buffers")
            for key, t in getattr(m, kind).items() if t is not None]
    experts.other.to(device)
    try:
        yield
    finally:
        for m, kind, key, t, data in held:  # (.to moves a Parameter's data, or replaces it; it replaces buffers)
            t.data = data
            getattr(m, kind)[key] = t


def switch(high: DenoiseFn, low: DenoiseFn, boundary: float) -> DenoiseFn:
    """denoise_fn(x, t): the high-noise expert's at timesteps >= boundary * 1000 (σ >= boundary), else the
    low-noise one's, as the pipelines compare each step's timestep with boundary_ratio * num_train_timesteps."""
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return high(x, t) if float(t[0]) >= boundary * FLOW_TIMESTEPS else low(x, t)

    return denoise
