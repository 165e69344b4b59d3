"""`dit to-diffusers RUN --out DIR`: a pretrained family's trained transformer as a diffusers model folder
(config.json + diffusion_pytorch_model*.safetensors, written by diffusers' own save_pretrained), which
``WanTransformer3DModel.from_pretrained(DIR)`` (or the family's class) loads, and which replaces the transformer/
of the base download: ``WanPipeline.from_pretrained(BASE, transformer=...)``. A LoRA run's adapter is merged into
its base first (alpha / rank x --scale); the checkpoint's weights are the EMA ones, as `dit sample` samples.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from data_pipelines.config import ConfigError
from dit.fileio import publish
from dit.models.diffusers_folder import frozen_dtype
from dit.weights import checkpoint_weights

PREFIX = "transformer."  # our state dict's keys: transformer.<diffusers name>


def export_diffusers(run: str | Path, out: str | Path, dtype: str = "fp32", scale: float = 1.0) -> Path:
    """Write the newest intact checkpoint of ``run`` (or that checkpoint) as a diffusers transformer folder ``out``,
    its weights in ``dtype`` (fp32 | bf16 | fp16); returns ``out``."""
    from accelerate import init_empty_weights

    from dit.models.families import FAMILIES

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {str(out)!r} exists; give a new directory")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16")
    weights, config = checkpoint_weights(run, own_scale=scale)  # (a LoRA run: merged into its base)
    family = config["dit"].get("family", "dit")
    if family not in FAMILIES:
        raise ConfigError(f"{run}: a model of ours (model.family={family}), which has no diffusers class; its "
                          "checkpoint directory is what `dit sample` and train.init_from load")
    cls = FAMILIES[family].transformer_class()
    with init_empty_weights():
        model = cls.from_config(config["dit"]["diffusers"])
    own = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    missing, unexpected = set(model.state_dict()) - set(own), set(own) - set(model.state_dict())
    if missing or unexpected or len(own) != len(weights):
        raise ConfigError(f"{run}: its weights do not fit its recorded {cls.__name__} config (missing "
                          f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): a damaged checkpoint?")
    model.load_state_dict({k: v.to(frozen_dtype(dtype)) for k, v in own.items()}, strict=True, assign=True)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model.save_pretrained(tmp, safe_serialization=True)
    publish(tmp, out)  # (whole or not at all)
    return out
