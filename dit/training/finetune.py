"""Starting a run from trained weights (train.init_from) and training LoRA adapters (train.lora): the checks made
before any work, the weights loaded into the fresh model, and what a LoRA checkpoint records about its base."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipelines.config import ConfigError
from dit.config import Config
from dit.export import resolve_checkpoint
from dit.models.lora import LORA_FILE, adapter_weights, inject_lora, write_lora_file
from dit.weights import checkpoint_weights, folder_weights, is_diffusers_folder

log = logging.getLogger("dit.train")


def base_record(cfg: Config) -> dict[str, str] | None:
    """Where the run's starting weights come from (absolute), recorded in LoRA checkpoints; None: random init."""
    if cfg.train.init_from:
        return {"init_from": str(Path(cfg.train.init_from).resolve())}
    if cfg.model.family != "dit" and cfg.model.pretrained:
        return {"pretrained": str(Path(cfg.model.pretrained).resolve())}
    return None


def init_config(path: str) -> dict[str, Any] | None:
    """The model config ("dit" entry) of train.init_from when it is a checkpoint of ours (None for a diffusers
    folder); errors name the path and the fix."""
    if is_diffusers_folder(path):
        return None
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError:
        raise ConfigError(f"train.init_from: {path!r} is neither a run / checkpoint directory of dit (no "
                          "checkpoints/step-*/ with model.safetensors + config.json) nor a diffusers transformer "
                          "folder (config.json with _class_name)") from None
    return json.loads((ckpt / "config.json").read_text())["dit"]


def check_finetune(cfg: Config, model_config: dict[str, Any] | None) -> None:
    """Before any work: a LoRA run has a base to adapt, and train.init_from holds weights of the model this config
    builds (``model_config``: its "dit" entry, built on the meta device)."""
    t = cfg.train
    if t.lora.rank and base_record(cfg) is None:
        raise ConfigError("train.lora.rank: LoRA adapts trained weights, and this run starts from random ones: set "
                          "train.init_from=RUN_OR_CHECKPOINT (or model.pretrained for a family)")
    if not t.init_from:
        return
    source = init_config(t.init_from)
    if source is None:
        if cfg.model.family == "dit":
            raise ConfigError(f"train.init_from: {t.init_from!r} is a diffusers folder; set model.family to its "
                              "family (wan, cogvideox or ltx)")
        return  # the family's own folder check runs when its weights load
    if model_config is not None and source != model_config:
        differ = sorted(k for k in set(source) | set(model_config) if source.get(k) != model_config.get(k))
        if differ == ["condition_channels"] and "condition_channels" not in source:
            if t.lora.rank:  # LoRA freezes the patch embedding, so its new inputs would stay zero
                raise ConfigError(f"train.init_from: {t.init_from!r} is a text-to-video model, and an image-to-video "
                                  "run from it must train its patch embedding's new inputs, which LoRA freezes: "
                                  "use full fine-tuning (train.lora.rank=0)")
            return  # a text-to-video base for an image-to-video run: load_init_from widens the patch embedding
        shown = "; ".join(f"{k}: {source.get(k)!r} there, {model_config.get(k)!r} here" for k in differ[:4])
        raise ConfigError(f"train.init_from: {t.init_from!r} holds another model than this config builds ({shown}); "
                          "set model.* as in that run (its config.yaml)")


def load_init_from(model: nn.Module, path: str) -> None:
    """The weights of ``path`` (a checkpoint's EMA export, a LoRA run merged, or a diffusers folder) into
    ``model``; every key must fit."""
    weights = folder_weights(path) if is_diffusers_folder(path) else checkpoint_weights(path)[0]
    weights = widen_patch_embedding(model, weights)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"train.init_from: {path!r} does not fit this model (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}); set model.* as in that run")
    log.info("initialized from %s (weights only: fresh optimizer, LR schedule and step 0)", path)


def widen_patch_embedding(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text-to-video DiT's weights for an image-to-video one (model.condition=first_frame): the patch embedding's
    input columns for the condition channels start at zero, so the new model at step 0 is the base (patchify puts
    channels outermost: the condition's columns come after the latents')."""
    extra = getattr(model, "condition_channels", 0)
    w = weights.get("x_embed.weight")
    if not extra or w is None or w.shape == model.x_embed.weight.shape:
        return weights
    volume = model.x_embed.weight.shape[1] // (model.in_channels + extra)
    if w.shape != (model.x_embed.weight.shape[0], model.in_channels * volume):
        return weights  # another model: load_state_dict names the mismatch
    wide = torch.zeros_like(model.x_embed.weight, device="cpu", dtype=w.dtype)
    wide[:, :w.shape[1]] = w
    log.info("init_from: a text-to-video base; the patch embedding's %d condition input columns start at zero",
             wide.shape[1] - w.shape[1])
    return {**weights, "x_embed.weight": wide}


def initial_adapter(cfg: Config) -> dict[str, torch.Tensor]:
    """train.lora.init_from's adapter (file form, our module names) in this run's parametrization: A scaled so that
    the run's alpha / rank times B A is the update the file makes. ConfigError, before any work, for a missing file, a
    rank other than train.lora.rank, or bias deltas (which this LoRA does not train)."""
    from dit.weights import adapter_of

    lora, key = cfg.train.lora, "train.lora.init_from"
    if not Path(lora.init_from).exists():
        raise ConfigError(f"{key}: {lora.init_from!r} does not exist: give a LoRA run, checkpoint directory or "
                          ".safetensors file")
    adapter, meta = adapter_of(lora.init_from, cfg.model.family, key)
    bias = sorted(k for k in adapter if k.endswith(".lora_B.bias"))
    if bias:
        raise ConfigError(f"{key} {lora.init_from}: it holds bias deltas ({bias[0]}, ...), which a LoRA run here does "
                          "not train: sample with it (`dit sample --lora`), or start from an adapter without them")
    ranks = sorted({v.shape[0] for k, v in adapter.items() if k.endswith(".lora_A.weight")})
    if ranks != [lora.rank]:
        fix = (f"set train.lora.rank={ranks[0]}" if len(ranks) == 1 else
               "a run trains one rank on every module: start from an adapter of one rank")
        raise ConfigError(f"{key} {lora.init_from}: its rank is {'/'.join(map(str, ranks))}, train.lora.rank is "
                          f"{lora.rank}: {fix}")
    factor = meta["lora_alpha"] / meta["r"] / lora.scale
    return {k: v * factor if k.endswith(".lora_A.weight") else v for k, v in adapter.items()}


def add_adapters(model: nn.Module, lora: Any, initial: dict[str, torch.Tensor] | None, resume_from: Path | None,
                 is_main: bool) -> dict[str, float] | None:
    """train.lora's adapters on ``model`` (``lora``: a LoraConfig), started from ``initial`` (train.lora.init_from's,
    ``initial_adapter``) in a new run; with init_from and no train.lora.targets, the adapted modules are the file's
    (a resumed run: those its checkpoint records). Returns the base layer norms on the main process (``base_norms``,
    read before any strategy shards them), else None."""
    targets = lora.targets
    if lora.init_from and not targets:
        recorded = (json.loads((resume_from / "config.json").read_text())["lora"]["modules"]
                    if resume_from is not None else None)
        targets = adapter_targets(initial) if recorded is None else [re.escape(m) for m in recorded]
    modules = inject_lora(model, lora.rank, lora.alpha, lora.dropout, targets)
    if initial is not None:
        load_adapter(model, initial)
    log.info("LoRA rank %d on %d linear layers: %d trainable parameters of %d", lora.rank, len(modules),
             sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return base_norms(model, modules) if is_main else None


def adapter_targets(adapter: dict[str, torch.Tensor]) -> list[str]:
    """The modules an adapter (file form) covers, as train.lora.targets patterns (each name exactly)."""
    return [re.escape(m) for m in sorted({k.rsplit(".lora_", 1)[0] for k in adapter})]


@torch.no_grad()
def load_adapter(model: nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    """``adapter`` (file form) into the peft layers of ``model``; every tensor must find its parameter."""
    from dit.models.lora import ADAPTER

    params = dict(model.named_parameters())
    for k, v in adapter.items():
        module, kind = k.rsplit(".lora_", 1)
        name = f"{module}.lora_{kind.split('.')[0]}.{ADAPTER}.weight"
        if name not in params:
            raise ConfigError(f"train.lora.init_from: it adapts {module!r}, which train.lora.targets does not select: "
                              "add it there, or leave train.lora.targets unset (the file's modules)")
        if params[name].shape != v.shape:
            raise ConfigError(f"train.lora.init_from: its {k!r} is {tuple(v.shape)}, this model's adapter "
                              f"{tuple(params[name].shape)}: an adapter for another model")
        params[name].copy_(v)
    log.info("LoRA: the adapter starts from train.lora.init_from (%d modules)", len(adapter) // 2)


def write_adapter(ckpt: Path, ema_weights: dict[str, torch.Tensor], cfg: Config,
                  norms: dict[str, float] | None = None) -> dict[str, Any]:
    """The (EMA) adapter of a LoRA checkpoint as diffusers' LoRA file in ``ckpt``; returns config.json's "lora"
    record (rank, alpha, modules, base; with ``norms``, the base layers' ``base_norms``: the update's size)."""
    lora = cfg.train.lora
    adapter = adapter_weights(ema_weights)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in adapter})
    alpha = lora.alpha if lora.alpha is not None else float(lora.rank)
    write_lora_file(ckpt / LORA_FILE, adapter, family=cfg.model.family, rank=lora.rank, alpha=alpha,
                    modules=modules, dropout=lora.dropout)
    record = {"rank": lora.rank, "alpha": alpha, "modules": modules, "base": base_record(cfg)}
    update = update_size(adapter, alpha / lora.rank, norms) if norms else None
    if update is not None:  # (a diagnostic: a checkpoint is written with or without it)
        record["update"] = update
        log.info("LoRA update in this checkpoint: |scale B A| / |W| median %.3g%%, max %.3g%% (%s)",
                 100 * update["median"], 100 * update["max"], update["max_module"])
    return record


@torch.no_grad()
def base_norms(model: nn.Module, modules: list[str]) -> dict[str, float]:
    """The Frobenius norm of each adapted layer's frozen weight (peft's ``base_layer``), read before any strategy
    shards it: what ``update_size`` measures the adapter's update against."""
    named = dict(model.named_modules())
    return {m: float(named[m].base_layer.weight.detach().float().norm()) for m in modules}


@torch.no_grad()
def update_size(adapter: dict[str, torch.Tensor], scale: float, norms: dict[str, float]) -> dict[str, Any] | None:
    """How much the adapter changes its layers: |scale B A|_F / |W|_F per module (from r x r products, no d x d
    matrix: |B A|_F^2 = tr(B^T B A A^T)), as its median, its max and the module of the max (None when no module of
    ``norms`` is in ``adapter``). Near 0 after training: an adapter with no visible effect (raise train.lr or
    train.lora.alpha)."""
    rel = {}
    for m, w in norms.items():
        a, b = adapter.get(f"{m}.lora_A.weight"), adapter.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            continue
        a, b = a.double(), b.double()
        rel[m] = scale * float(torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0).sqrt()) / max(w, 1e-30)
    if not rel:
        return None
    values = sorted(rel.values())
    top = max(rel, key=rel.__getitem__)
    return {"median": values[(len(values) - 1) // 2], "max": rel[top], "max_module": top}


def hold_frozen_base(model: nn.Module, lora: Any, precision: str, strategy: str) -> str | None:
    """A LoRA run's frozen block linears in what train.lora.base_dtype asks (``lora``: a LoraConfig): fp8 weights
    (dit/models/fp8.py), then bf16 for the rest in a bf16 DDP run. Returns the line the log gives, or None."""
    from dit.models.fp8 import frozen_block_linears_to_fp8

    half = lora.base_in_bf16(precision, strategy)
    if lora.base_in_fp8:
        saved = frozen_block_linears_to_fp8(model, torch.bfloat16 if half else None)
        saved += frozen_block_linears_to_bf16(model) if half else 0
        return (f"LoRA base: the blocks' frozen linear weights held in fp8 e4m3 with a scale per row, the modulation "
                f"layers {'in bf16' if half else 'as loaded'} ({saved / 2**30:.2f} GiB less; "
                "train.lora.base_dtype=auto keeps them as autocast computes them)")
    if half:
        return (f"LoRA base: the blocks' frozen linear layers held in bf16, as autocast computes them "
                f"({frozen_block_linears_to_bf16(model) / 2**30:.2f} GiB less; train.lora.base_dtype=fp32 keeps "
                "them as loaded)")
    return None


def frozen_block_linears_to_bf16(model: nn.Module) -> int:
    """A LoRA run's frozen base, held in bf16 where bf16 autocast computes it anyway: every ``nn.Linear`` of the
    blocks whose parameters are all frozen (the adapters' own layers train and stay fp32). Autocast casts a linear's
    fp32 weight and bias to bf16 at each call, so the outputs are the same; the base takes half the bytes, and the
    per-call cast (autocast caches none for frozen weights) is gone. Returns the bytes saved."""
    saved = 0
    for module in model.blocks.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.Linear) and params and not any(p.requires_grad for p in params):
            saved += sum(p.numel() for p in params if p.dtype == torch.float32) * 2
            module.to(torch.bfloat16)
    return saved
