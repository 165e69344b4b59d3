"""The sampling pipeline: load a checkpoint export (weights + config + VAE) -> (denoiser, VAE, text encoder,
schedule); sample latents with classifier-free guidance, decode, write media. Used by `dit sample`, by validation
sampling during training and by the demo; it reads exports (dit/export.py), never the training code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from data_pipelines.config import SPATIAL, TEMPORAL, size_problems
from dit.config import Config, DiffusionConfig, TextConfig
from dit.diffusion.cuda_graphs import CudaGraphed
from dit.diffusion.flow import latent_tokens, sampling_grid, sampling_shift
from dit.diffusion.guidance import cfg_denoiser, dynamic_scale
from dit.diffusion.samplers import SAMPLERS, Callback
from dit.diffusion.schedules import Schedule, make_schedule
from dit.experts import Experts, load_expert, switch
from dit.export import resolve_checkpoint
from dit.models.attention import resolve_backend
from dit.models.condition import clip_mask, clip_states_of, first_frame_condition, image_code
from dit.models.dit import DiT
from dit.models.families import denoiser_from_config, held_weights
from dit.models.image_encoder import ImageEncoder, build_image_encoder
from dit.models.text import TextEncoder, build_text_encoder, text_device
from dit.models.vae import CausalVAE, load_vae, load_vae_from_config
from dit.released import release_config, release_weights
from dit.weights import checkpoint_weights, with_lora

log = logging.getLogger("dit.pipeline")
OBJECTIVE_SAMPLERS = {"diffusion": ("ddim", "ddpm", "dpm_solver", "cogvideox_dpm"),
                      "flow": ("flow_euler", "flow_dpm_solver", "flow_unipc")}


@dataclass
class Pipeline:
    model: DiT
    vae: CausalVAE
    text: TextEncoder
    schedule: Schedule  # the discrete schedule (objective diffusion; unused for flow)
    prediction: str
    config: dict[str, Any]
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # objective, flow shift (static / dynamic)
    graphed: CudaGraphed | None = None  # the model's CUDA graphs (cuda_graphs=True), kept across calls: one capture
    image: ImageEncoder | None = None  # Wan 2.1 I2V's CLIP image encoder (model.image_encoder)
    experts: Experts | None = None  # the other expert of a Wan 2.2 A14B pair (dit/experts.py)


def schedule_from_config(diffusion: dict[str, Any] | Any) -> Schedule:
    d = diffusion if isinstance(diffusion, dict) else vars(diffusion)
    return make_schedule(d["schedule"], d["num_timesteps"], beta_start=d["beta_start"], beta_end=d["beta_end"],
                         zero_terminal_snr=d["zero_terminal_snr"], snr_shift_scale=d.get("snr_shift_scale", 1.0))


def load_pipeline(path: str | Path | Config, device: str | torch.device = "cpu", text: TextEncoder | None = None,
                  lora: str | Path | None = None, lora_scale: float = 1.0,
                  expert: str | Path | None = None, fp8: bool = False,
                  weights_dtype: torch.dtype = torch.float32) -> Pipeline:
    """Everything needed to sample, from a run directory (newest complete checkpoint), a checkpoint directory, or an
    experiment config naming a released model's folders (dit/released.py). A LoRA run samples its base with its
    adapter merged; ``lora`` (a LoRA run, checkpoint or adapter file) adds
    another adapter at ``lora_scale``. ``expert``: the other expert of a checkpoint trained as one of two (a run,
    checkpoint or diffusers transformer folder; dit/experts.py). ``fp8``: the blocks' linear weights (adapters merged)
    held as e4m3 codes with row scales, converted on the CPU before the move (dit/models/fp8.py). ``weights_dtype``:
    the denoisers' weights (bf16 for sampling under bf16 autocast: half the memory; what a family keeps in fp32
    stays so, as diffusers' pipelines load it)."""
    if isinstance(path, Config):  # a released model: its folders, no checkpoint
        config = release_config(path)
        weights = release_weights(path)
        weights = with_lora(weights, config, lora, lora_scale) if lora is not None else weights
        vae_of = partial(load_vae_from_config, path.vae)
    else:
        ckpt = resolve_checkpoint(path)
        weights, config = checkpoint_weights(ckpt, lora, lora_scale)
        vae_of = partial(load_vae, ckpt / "vae")
    experts = (load_expert(config, expert, device, fp8, dtype=weights_dtype) if expert is not None
               else None)  # checked before the rest
    if weights_dtype != torch.float32:
        held_weights(weights, config["dit"].get("family", "dit"), weights_dtype)
    model = denoiser_from_config(config["dit"], weights)  # our DiT or a pretrained family, as the checkpoint says
    if fp8:
        from dit.models.fp8 import frozen_block_linears_to_fp8

        frozen_block_linears_to_fp8(model.eval().requires_grad_(False))
    vae = vae_of()
    text = text or build_text_encoder(TextConfig(**config["experiment"]["text"]))
    schedule = schedule_from_config(config["experiment"]["diffusion"])
    for m in (model, vae):
        m.to(device).eval().requires_grad_(False)
    text.to(text_device(TextConfig(**config["experiment"]["text"]), device)).eval().requires_grad_(False)
    kernel = getattr(model, "attention_backend", None)  # our DiT's model.attention, as trained
    if kernel is not None:
        try:
            resolve_backend(kernel, torch.device(device))
        except RuntimeError:  # e.g. trained with cudnn on a GPU, sampled on a CPU: the same attention, other kernel
            log.warning("this checkpoint was trained with model.attention=%s, which %s lacks: sampling with sdpa",
                        kernel, torch.device(device).type)
            model.attention_backend = "sdpa"
    diffusion = DiffusionConfig(**config["experiment"]["diffusion"])
    image = build_image_encoder(config["experiment"]["model"].get("image_encoder"))
    if image is not None:
        image.to(device)
    return Pipeline(model, vae, text, schedule, diffusion.prediction, config, diffusion, image=image,
                    experts=experts)


def check_size(frames: int, height: int, width: int, patch: tuple[int, int, int], *, temporal: int = TEMPORAL,
               spatial: int = SPATIAL, pads: bool = False) -> None:
    """Refuse a size the VAE (of this compression) and the patch grid cannot represent, naming the nearest valid
    values; ``pads``: the model pads latent frames its temporal patch does not divide (CogVideoX 1.5)."""
    patch = (1, *patch[1:]) if pads else patch
    problems = size_problems(frames, height, width, patch=patch, temporal=temporal, spatial=spatial)
    if problems:
        raise ValueError("invalid sample size: " + "; ".join(problems.values()))


def resolve_sampler(objective: str, sampler: str | None) -> str:
    """The sampler to run for a checkpoint of this objective: None picks its default (ddim | flow_euler); a sampler
    of the other objective is an error (a flow model's velocity is not an eps / v prediction, nor the reverse)."""
    if objective not in OBJECTIVE_SAMPLERS:
        raise ValueError(f"unknown diffusion objective {objective!r}; expected one of {sorted(OBJECTIVE_SAMPLERS)}")
    if sampler is None:
        return OBJECTIVE_SAMPLERS[objective][0]
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if sampler not in OBJECTIVE_SAMPLERS[objective]:
        raise ValueError(f"sampler {sampler!r} does not fit this checkpoint, trained with diffusion.objective="
                         f"{objective}: use one of {', '.join(OBJECTIVE_SAMPLERS[objective])}")
    return sampler


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], *, frames: int, height: int, width: int, steps: int = 50,
             sampler: str | None = None, cfg: float = 5.0, eta: float = 0.0, seed: int = 0,
             decode_chunk: int = 0, shift: float | None = None, callback: Callback = None,
             image: torch.Tensor | None = None, dtype: str = "fp32", cuda_graphs: bool = False,
             cfg_low: float | None = None, guidance: float | None = None,
             clip_image: torch.Tensor | None = None, last_image: torch.Tensor | None = None,
             clip_last_image: torch.Tensor | None = None, dynamic_cfg: bool = False) -> torch.Tensor:
    """Sample one clip per prompt: [B, 3, T, H, W] in [-1, 1].

    sampler None: the checkpoint objective's default (ddim, or flow_euler for flow). shift (flow samplers only): a
    static shift; None uses the training one (diffusion.shift, or the dynamic shift for this size's token count).
    callback(i, x): called after each sampler step (progress). image: the first frame to continue (a checkpoint
    trained with model.condition=first_frame), [B or 1, 3, height, width] uint8 or float in [-1, 1]. dtype "bf16":
    the denoiser under bf16 autocast (the sampler's arithmetic and the VAE stay fp32); cuda_graphs: replay the
    denoiser from a CUDA graph (dit/diffusion/cuda_graphs.py). cfg_low: with two experts, the low-noise expert's
    guidance scale (None: cfg), as the pipelines' guidance_scale_2. guidance: a guidance-distilled HunyuanVideo's or
    FLUX.1-dev's embedded guidance scale (None: its pipeline's guidance_scale, 6.0 or 3.5); other models take none.
    clip_image: Wan 2.1 I2V's CLIP input, the first frame as given before resizing (``read_pixels``), as
    WanImageToVideoPipeline gives it to CLIP; None: ``image``. last_image / clip_last_image: Wan 2.1 FLF2V's last
    frame, as ``image`` / ``clip_image`` are its first. dynamic_cfg: CogVideoX's rising guidance scale
    (``dynamic_scale``; needs cfg > 1).
    """
    vae = pipe.vae
    pads = getattr(pipe.model, "pads_frames", False)
    check_size(frames, height, width, pipe.model.patch, temporal=vae.temporal_compression,
               spatial=vae.spatial_compression, pads=pads)
    objective = pipe.diffusion.objective
    sampler = resolve_sampler(objective, sampler)
    if shift is not None and objective != "flow":
        raise ValueError(f"shift={shift} is for flow samplers; this checkpoint's objective is {objective}")
    device = next(pipe.model.parameters()).device
    b = len(prompts)
    t, h, w = vae.latent_shape(frames, height, width)
    # CogVideoX 1.5 at an odd latent count: one more frame of noise at the front, dropped before decoding (as its
    # pipelines do)
    pad = (-t) % pipe.model.patch[0] if pads else 0
    shape = (b, vae.latent_channels, t + pad, h, w)  # [B, C, t (+ pad), h, w]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if getattr(pipe.model, "frames_first", False):  # drawn as its pipelines hold latents, [B, F, C, H, W]:
        noise = torch.randn(shape[0], shape[2], shape[1], *shape[3:], generator=gen).transpose(1, 2)  # same seeds
    else:
        noise = torch.randn(shape, generator=gen)
    noise = noise.contiguous().to(device)
    states, mask = pipe.text.encode(list(prompts) + [""] * b)  # one call: cond and uncond share the padding
    embedded = embedded_guidance(pipe.model, guidance)  # (the same for both halves of the guidance)
    cond = dict(text=states[:b].to(device), text_mask=mask[:b].to(device), **embedded)
    uncond = dict(text=states[b:].to(device), text_mask=mask[b:].to(device), **embedded)
    z = sample_latents(pipe, noise, cond, uncond, steps=steps, sampler=sampler, cfg=cfg, eta=eta, generator=gen,
                       shift=shift, callback=callback, image=image, dtype=dtype, cuda_graphs=cuda_graphs,
                       cfg_low=cfg_low, clip_image=clip_image, last_image=last_image,
                       clip_last_image=clip_last_image, dynamic_cfg=dynamic_cfg)
    return decode_latents(pipe, z[:, :, pad:], decode_chunk)


def embedded_guidance(model: torch.nn.Module, guidance: float | None) -> dict[str, float]:
    """The denoiser keyword a guidance-distilled HunyuanVideo or FLUX.1-dev takes: its embedded guidance scale (None:
    its pipeline's, 6.0 or 3.5); nothing for other models, which refuse a scale."""
    if getattr(model, "distilled", False):
        return {"guidance": model.sample_guidance if guidance is None else float(guidance)}
    if guidance is not None:
        raise ValueError(f"guidance={guidance} is the embedded guidance scale of a guidance-distilled HunyuanVideo or "
                         "FLUX.1-dev; "
                         "this checkpoint's model takes none: use cfg (classifier-free guidance)")
    return {}


def autocast_bf16(model: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """model's forward under bf16 autocast, its output back in fp32 (guidance and sampler steps stay fp32)."""
    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(*args, **kwargs).float()

    return call


@torch.no_grad()
def sample_latents(pipe: Pipeline, noise: torch.Tensor, cond: dict[str, torch.Tensor],
                   uncond: dict[str, torch.Tensor], *, steps: int, sampler: str | None = None, cfg: float = 5.0,
                   eta: float = 0.0, generator: torch.Generator | None = None,
                   shift: float | None = None, callback: Callback = None,
                   image: torch.Tensor | None = None, dtype: str = "fp32", cuda_graphs: bool = False,
                   cfg_low: float | None = None, clip_image: torch.Tensor | None = None,
                   last_image: torch.Tensor | None = None, clip_last_image: torch.Tensor | None = None,
                   dynamic_cfg: bool = False) -> torch.Tensor:
    """Denoise starting latents [B, C, t, h, w] with classifier-free guidance (cond / uncond: text states and mask)
    by the checkpoint's objective and sampling settings; returns normalized latents. ``callback(i, x)``: after each
    sampler step. ``image``: a first frame to continue (see ``image_condition``), given to both CFG branches.
    ``dtype`` / ``cuda_graphs`` / ``cfg_low`` / ``clip_image`` / ``last_image`` / ``clip_last_image`` /
    ``dynamic_cfg``: as ``generate``'s. A CogVideoX 1.5 clip of an odd latent count comes and goes with its front
    pad frame (``generate`` adds it to the noise and drops it before decoding)."""
    objective = pipe.diffusion.objective
    sampler = resolve_sampler(objective, sampler)
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    condition = None
    if (last_image is not None) != bool(getattr(pipe.model, "last_frame", False)):
        raise ValueError("a Wan 2.1 FLF2V checkpoint samples from a first and a last frame (--image and --last-image)"
                         if last_image is None else "this checkpoint takes no last frame (not a Wan 2.1 FLF2V model): "
                         "sample without --last-image")
    if image is not None:  # the same condition at every step, for the conditional and unconditional branch alike
        condition = image_condition(pipe, image, noise.shape, last=last_image)
        extra = {"condition": condition}
        if getattr(pipe.model, "clip_image", False):  # Wan 2.1 I2V: and the image's CLIP states
            first = image if clip_image is None else clip_image
            last = last_image if clip_last_image is None else clip_last_image
            extra["image_states"] = image_states(pipe, first, noise.shape[0], last=last)
        cond, uncond = {**cond, **extra}, {**uncond, **extra}
    z = _sample(pipe, noise, cond, uncond, steps=steps, sampler=sampler, cfg=cfg, eta=eta, generator=generator,
                shift=shift, callback=callback, dtype=dtype, cuda_graphs=cuda_graphs, cfg_low=cfg_low,
                dynamic_cfg=dynamic_cfg)
    finish = getattr(pipe.model, "finish_sample", None)  # (Wan: the image back in place of frame 0)
    return finish(z, condition) if finish is not None else z


def _sample(pipe: Pipeline, noise: torch.Tensor, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], *,
            steps: int, sampler: str, cfg: float, eta: float, generator: torch.Generator | None,
            shift: float | None, callback: Callback, dtype: str, cuda_graphs: bool,
            cfg_low: float | None = None, dynamic_cfg: bool = False) -> torch.Tensor:
    objective = pipe.diffusion.objective
    model: Callable[..., torch.Tensor] = pipe.model
    if pipe.experts is not None and (cuda_graphs or objective != "flow"):
        raise ValueError("two experts sample with the flow samplers, without CUDA graphs")
    if cuda_graphs:  # captured at the first call of each shape, replayed from then on (every batch of `dit sample`)
        if pipe.graphed is None or pipe.graphed.model is not pipe.model:
            pipe.graphed = CudaGraphed(pipe.model)
        model = pipe.graphed
    if dtype == "bf16":
        model = autocast_bf16(model, noise.device)
    # (Qwen-Image: its pipeline's guidance rescales the combined prediction)
    if dynamic_cfg and (cfg <= 1 or pipe.experts is not None):
        raise ValueError("dynamic_cfg raises a guidance scale above 1 over the steps (CogVideoX's use_dynamic_cfg): "
                         f"give cfg > 1 (got {cfg:g}), with one model")
    scale = dynamic_scale(cfg, steps) if dynamic_cfg else cfg
    denoise = cfg_denoiser(model, cond, uncond, scale, combine=getattr(pipe.model, "guide", None))
    if pipe.experts is not None:  # Wan 2.2 A14B: cfg guides the high-noise expert, cfg_low the low-noise one
        other: Callable[..., torch.Tensor] = pipe.experts.other
        if dtype == "bf16":
            other = autocast_bf16(other, noise.device)
        low_cfg = cfg if cfg_low is None else cfg_low
        if pipe.experts.other_high:
            high, low = cfg_denoiser(other, cond, uncond, cfg), cfg_denoiser(model, cond, uncond, low_cfg)
        else:
            high, low = denoise, cfg_denoiser(other, cond, uncond, low_cfg)
        denoise = switch(high, low, pipe.experts.boundary)
    if objective == "flow":
        flow_shift, mu = sampling_shift(pipe.diffusion, latent_tokens(noise.shape[2:], pipe.model.patch), shift)
        return SAMPLERS[sampler](denoise, noise, steps=steps, shift=flow_shift, mu=mu, callback=callback,
                                 **sampling_grid(pipe.diffusion))
    kwargs: dict[str, Any] = dict(steps=steps, prediction=pipe.prediction, callback=callback)
    if sampler == "ddim":
        kwargs["eta"] = eta
    if sampler in ("ddim", "ddpm", "cogvideox_dpm"):
        kwargs["generator"] = generator
    if sampler == "cogvideox_dpm":  # its noise drawn as CogVideoX's pipelines draw it, for seeded parity
        kwargs["frames_first"] = getattr(pipe.model, "frames_first", False)
    if sampler in ("ddim", "dpm_solver", "cogvideox_dpm") and pipe.diffusion.timestep_spacing:
        kwargs["timestep_spacing"] = pipe.diffusion.timestep_spacing
    # on the latents' device: else each step copies it to the GPU from pageable memory, and the host waits
    return SAMPLERS[sampler](denoise, noise, pipe.schedule.to(noise.device), **kwargs)


@torch.no_grad()
def image_condition(pipe: Pipeline, image: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                    last: torch.Tensor | None = None) -> torch.Tensor:
    """A first frame [B or 1, 3, H, W] (uint8, or float in [-1, 1]) -> the DiT's image-to-video condition for latents
    of ``shape`` [B, C, t, h, w]: the image encoded by the VAE as a 1-frame clip (posterior mean, normalized) at
    latent frame 0, zeros after it, and the mask channel where the model takes one (dit/models/condition.py).
    ``last``: Wan 2.1 FLF2V's last frame, as ``image``."""
    if not getattr(pipe.model, "condition_channels", 0):
        raise ValueError("this checkpoint was not trained to continue a first frame (model.condition=none): sample "
                         "without an image, or train with model.condition=first_frame")
    b, _, t, h, w = shape
    size = (h * pipe.vae.spatial_compression, w * pipe.vae.spatial_compression)
    device = next(pipe.model.parameters()).device
    x = _frame(image, b, size, device, "image")  # [B, 3, H, W] in [-1, 1]
    if getattr(pipe.model, "code_condition", False):  # Wan's code form: the mask, then the code of [image, grey...]
        temporal = pipe.vae.temporal_compression
        y = None if last is None else _frame(last, b, size, device, "last image")
        code = image_code(pipe.vae, x, (t - 1) * temporal + 1, y)  # [B, C, t, h, w]
        mask = clip_mask(t, h, w, temporal, last is not None).to(code).expand(b, -1, -1, -1, -1)
        return torch.cat([mask, code], dim=1)
    first = pipe.vae.normalize(pipe.vae.encode(x[:, :, None]).mode())  # [B, C, 1, h, w]
    first = first * pipe.vae.condition_scale  # (CogVideoX 1.5's VAE: see vae_families)
    return first_frame_condition(first, t, mask=pipe.model.condition_mask)  # [B, C (+ 1), t, h, w]


def _frame(image: torch.Tensor, b: int, size: tuple[int, int], device: torch.device, name: str) -> torch.Tensor:
    """A given frame [B or 1, 3, H, W] (uint8, or float in [-1, 1]) of the sampling size -> [B, 3, H, W] in [-1, 1]
    on ``device``."""
    x = image if image.ndim == 4 else image[None]  # [B, 3, H, W]
    x = x.float() / 127.5 - 1.0 if image.dtype == torch.uint8 else x.float()
    if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != size or x.shape[0] not in (1, b):
        raise ValueError(f"{name}: expected [{b} or 1, 3, {size[0]}, {size[1]}] (the sampling size), got "
                         f"{tuple(image.shape)}")
    return x.to(device).expand(b, -1, -1, -1)


@torch.no_grad()
def image_states(pipe: Pipeline, image: torch.Tensor, batch: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """A Wan 2.1 I2V model's CLIP states of the image [B or 1, 3, H, W] -> [batch, tokens, D] (the same image for
    every row when one is given); ``last`` (FLF2V): the last frame's after them, [batch, 2 x tokens, D]."""
    if pipe.image is None:
        raise ValueError("this Wan 2.1 I2V checkpoint's model.image_encoder was not loaded (the pipeline has no CLIP "
                         "image encoder); load it with load_pipeline from the run's checkpoint")
    x, y = (None if z is None else z if z.ndim == 4 else z[None] for z in (image, last))
    if y is not None and y.shape[0] != x.shape[0]:
        x, y = x.expand(max(len(x), len(y)), -1, -1, -1), y.expand(max(len(x), len(y)), -1, -1, -1)
    states = clip_states_of(pipe.image, x, y)  # [B or 1, n (x 2), D]
    return states.to(next(pipe.model.parameters()).device).expand(batch, -1, -1)


def read_pixels(path: str | Path) -> torch.Tensor:
    """An image file decoded as it is: uint8 [1, 3, H, W]; ValueError naming the file when it cannot be decoded."""
    from data_pipelines.decode import DecodeError, decode_image

    try:
        pixels = decode_image(Path(path).read_bytes())  # uint8 [H, W, 3]
    except (OSError, DecodeError) as e:
        raise ValueError(f"{str(path)!r}: {e}") from None
    return torch.as_tensor(pixels).permute(2, 0, 1)[None]


def read_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file as a first frame: decoded, resized (shorter side) and center-cropped to height x width, [1, 3,
    height, width] in [-1, 1]; ValueError naming the file when it cannot be decoded."""
    from data_pipelines.decode import resize_crop

    pixels = read_pixels(path).permute(0, 2, 3, 1)  # uint8 [1, H, W, 3]
    return resize_crop(pixels, height, width).transpose(0, 1)  # [1, 3, height, width]


@torch.no_grad()
def decode_latents(pipe: Pipeline, z: torch.Tensor, decode_chunk: int = 0) -> torch.Tensor:
    """Normalized latents [B, C, t, h, w] -> frames [B, 3, T, H, W] in [-1, 1] through the checkpoint's VAE."""
    return pipe.vae.decode(pipe.vae.denormalize(z), chunk_size=decode_chunk).clamp(-1, 1)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3]."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [B, 3, T, H, W]
    return rearrange(x, "b c t h w -> b t h w c").cpu().numpy()


def write_media(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write uint8 [T, H, W, 3] as .mp4 (PyAV, h264), .gif, or .png (T = 1, or the first frame)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        Image.fromarray(frames[0]).save(path)
    elif suffix == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    elif suffix == ".mp4":
        from data_pipelines.writer import encode_mp4

        path.write_bytes(encode_mp4(frames, fps=fps))
    else:
        raise ValueError(f"unsupported output {path.name!r}: use .mp4, .gif or .png")
    return path


def default_suffix(frames: int) -> str:
    return ".png" if frames == 1 else ".mp4"
