"""Typed experiment configs: one dataclass per component, loaded from YAML with dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.steps=200", "data.shards=data/{00000..00003}.tar"])

Every value is checked against its annotation and each section's ``__post_init__`` before any work
starts; an unknown key or a bad value raises ``ConfigError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipelines.config import (  # noqa: F401 (re-exported: dit.config is the one place to import configs)
    SPATIAL,
    BucketConfig,
    ConfigError,
    DataConfig,
    _check,
    frames_problem,
    nearest_multiple,
    size_problems,
)
from dit.family_rules import (  # noqa: F401 (re-exported)
    FAMILY_TITLES,
    IMAGE_MODELS,
    PRETRAINED_FAMILIES,
    TEXT_OF_FAMILY,
    VAE_FAMILIES,
    check_family_run,
    check_image_encoder_key,
)

# model.attention: torch SDPA choosing its kernel, one SDPA kernel pinned, or xformers (dit/models/attention.py)
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "efficient", "cudnn", "math", "xformers")
FROZEN_DTYPES = ("fp32", "bf16", "fp16")  # text.dtype, vae.dtype: what the frozen encoders' weights are held in
TEXT_ENCODERS = ("minilm", "hf", "hunyuan", "hunyuan15", "flux", "sd3", "zimage", "qwenimage", "none")  # text.encoder
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")  # train.strategy: how the training is sharded over ranks


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass
class ModelConfig:
    preset: str = "dit-tiny"  # a name in dit.models.presets.PRESETS
    hidden_size: int | None = None  # overrides of the preset; None keeps the preset's value
    depth: int | None = None
    num_heads: int | None = None
    patch_size: list[int] | None = None  # [pt, ph, pw]
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    drop_path: float = 0.0
    # auto | sdpa (torch picks the kernel) | flash | efficient | cudnn | math (that SDPA kernel) | xformers
    attention: str = "auto"
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: recompute every k-th block only (1: all), the rest keep their activations
    gradient_checkpointing_every: int = 1
    compile: bool = False  # torch.compile each block in place (dit/distributed/parallelize.py); needs a C++ compiler
    # self-attention's q and kv projections as one linear layer (one GEMM); exports keep the plain q / kv layout
    fused_qkv: bool = False
    abs_pos: bool = True  # add fixed sin/cos absolute positions (for the actual grid) to the tokens, beside 3D RoPE
    # dit (ours) | wan | cogvideox | ltx | hunyuan | hunyuan15 (HunyuanVideo 1.5) | flux | sd3 | zimage | qwenimage:
    # a diffusers transformer behind our contract (the last four: image models)
    family: str = "dit"
    pretrained: str | None = None  # family: a local diffusers transformer folder (config.json + *.safetensors)
    family_config: dict = field(default_factory=dict)  # family without pretrained: diffusers constructor overrides
    frame_rate: float = 25.0  # ltx: the frames per second its RoPE time axis is scaled by (LTXPipeline's frame_rate)
    # hunyuan, flux: the embedded guidance scale a guidance-distilled transformer is trained at (finetrainers' and
    # musubi-tuner's 1.0); sampling uses sample.guidance
    guidance: float = 1.0
    # Image-to-video (dit/models/condition.py): none | first_frame (the first frame's latent + a mask, concatenated to
    # the noisy latents' channels; our DiT, CogVideoX-I2V without the mask; Wan and LTX replace the first latent
    # frame, as Wan 2.2 TI2V and LTXImageToVideoPipeline). Training gives the condition to
    # condition_prob of the samples (the rest get zeros: text-to-video) with Gaussian noise of std up to
    # condition_noise on its latent.
    condition: str = "none"
    condition_prob: float = 0.9
    condition_noise: float = 0.05
    # a Wan 2.1 I2V transformer (image_dim): its CLIP image encoder, a local CLIPVisionModel folder (the Diffusers
    # download's image_encoder/, with image_processor/ beside it); HunyuanVideo 1.5 I2V: its SigLIP (image_encoder/,
    # feature_extractor/ beside)
    image_encoder: str | None = None

    def __post_init__(self) -> None:
        from dit.models.presets import PRESETS

        self._check_family()
        _check(self.condition in ("none", "first_frame"), "model.condition", "must be none or first_frame")
        _check(0.0 <= self.condition_prob <= 1.0, "model.condition_prob", "must be in [0, 1]")
        _check(self.condition_noise >= 0.0, "model.condition_noise", "must be >= 0")

        _check(self.preset in PRESETS, "model.preset",
               f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        _check(self.attention in ATTENTION_BACKENDS, "model.attention",
               f"must be one of {', '.join(ATTENTION_BACKENDS)}")
        _check(self.gradient_checkpointing_every >= 1, "model.gradient_checkpointing_every",
               "must be >= 1 (1: every block is recomputed, k: every k-th block)")
        if self.patch_size is not None:
            _check(len(self.patch_size) == 3 and all(p >= 1 for p in self.patch_size),
                   "model.patch_size", "must be three positive integers [pt, ph, pw]")
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")

    def _check_family(self) -> None:
        """A family's folder and sizes are checked here, before any work; its patch fills model.patch_size."""
        check_image_encoder_key(self)
        if self.image_encoder:
            from dit.models.image_encoder import read_image_encoder

            read_image_encoder(self.image_encoder)
        if self.family == "dit":
            _check(self.pretrained is None, "model.pretrained", f"needs model.family={PRETRAINED_FAMILIES}")
            _check(not self.family_config, "model.family_config", f"needs model.family={PRETRAINED_FAMILIES}")
            return
        from dit.models.families import FAMILY_NAMES, family_patch

        _check(self.family in FAMILY_NAMES, "model.family",
               f"unknown family {self.family!r}; choose one of {', '.join(FAMILY_NAMES)}")
        _check(not self.fused_qkv, "model.fused_qkv",
               f"is implemented for our DiT (model.family=dit), not the {self.family} adapter; set it to false")
        for key in ("hidden_size", "depth", "num_heads"):
            _check(getattr(self, key) is None, f"model.{key}",
                   f"sizes our DiT only; a {self.family} model takes its sizes from model.pretrained or "
                   "model.family_config")
        _check(self.frame_rate > 0, "model.frame_rate", "must be > 0")
        _check(self.guidance >= 0, "model.guidance", "must be >= 0")
        patch = family_patch(self.family, self.pretrained, self.family_config)
        _check(self.patch_size in (None, patch), "model.patch_size",
               f"{self.patch_size} differs from the {self.family} transformer's patch {patch}; remove it")
        self.patch_size = patch


@dataclass
class VAEConfig:
    # ours (our CausalVAE, vae.checkpoint) | wan | cogvideox | hunyuan | hunyuan15 | ltx | flux (FLUX.1's image VAE,
    # Z-Image's too) | sd3 | qwenimage: vae.pretrained
    family: str = "ours"
    pretrained: str | None = None  # a family: a local diffusers VAE folder, e.g. .../Wan2.1-T2V-1.3B-Diffusers/vae
    #                                (unset: `dit plan` takes the released model's sizes; train / encode need it)
    tiling: bool = False  # a family: diffusers' tiled encode/decode (enable_tiling) for large frames
    # a family without vae.pretrained: diffusers VAE constructor overrides for another release's sizes (`dit plan`,
    # e.g. Wan 2.2's z_dim 48 and 16x space); with a folder its config.json must agree
    family_config: dict = field(default_factory=dict)
    # a family's frozen weights: fp32 | bf16 | fp16 (CogVideoX and LTX pipelines run their VAE in bf16, Wan's in fp32)
    dtype: str = "fp32"
    checkpoint: str | None = None  # a directory written by `dit train-vae` (vae.safetensors + vae.json)
    latent_channels: int = 4
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # 3 downsamples: /8 in space
    num_res_blocks: int = 1
    kl_weight: float = 1e-6
    l1_weight: float = 1.0  # reconstruction loss = l1_weight * L1 + MSE (+ kl_weight * KL); 0 for sparse content
    decode_chunk: int = 0  # latent frames per decode chunk (0: all at once)
    image_steps: int = 0  # train-vae: the first N steps train on single frames (T = 1) before the clips
    chroma_weight: float = 0.0  # train-vae: weight of the opponent-colour (hue) error term (dit/models/vae.py)

    def __post_init__(self) -> None:
        _check(self.latent_channels >= 1, "vae.latent_channels", "must be >= 1")
        _check(len(self.channel_mults) == 4, "vae.channel_mults",
               "needs exactly 4 entries (three 2x spatial downsamples give the fixed 8x factor)")
        _check(self.kl_weight >= 0, "vae.kl_weight", "must be >= 0")
        _check(self.l1_weight >= 0, "vae.l1_weight", "must be >= 0")
        _check(self.image_steps >= 0, "vae.image_steps", "must be >= 0 (0: no image phase)")
        _check(self.chroma_weight >= 0, "vae.chroma_weight", "must be >= 0")
        from dit.models.vae_folder import FAMILIES, vae_geometry

        _check(self.family == "ours" or self.family in FAMILIES, "vae.family",
               f"unknown family {self.family!r}; choose ours or one of {', '.join(FAMILIES)}")
        _check(self.dtype in FROZEN_DTYPES, "vae.dtype", f"must be one of {', '.join(FROZEN_DTYPES)}, got "
               f"{self.dtype!r}")
        if self.family == "ours":
            _check(self.dtype == "fp32", "vae.dtype", f"is for vae.family={VAE_FAMILIES} (our CausalVAE stays fp32: "
                   "it is small); remove it")
            _check(self.pretrained is None, "vae.pretrained", f"is for vae.family={VAE_FAMILIES}; our CausalVAE "
                   "loads vae.checkpoint: set vae.family or drop vae.pretrained")
            _check(not self.family_config, "vae.family_config", f"is for vae.family={VAE_FAMILIES}")
            return
        _check(self.checkpoint is None, "vae.checkpoint", f"is our CausalVAE (a `dit train-vae` output), while "
               f"vae.family={self.family} loads vae.pretrained: drop vae.checkpoint")
        if not self.pretrained and not self.family_config:  # `dit plan` takes the family's defaults (no import)
            return
        try:  # the folder (or, without one, the family_config keys) checked before any work
            vae_geometry(self.family, self.pretrained, self.family_config)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None

    def geometry(self) -> tuple[int, int, int]:
        """(latent channels, temporal, spatial compression) of the chosen VAE, read without loading weights."""
        import json

        from data_pipelines.config import TEMPORAL
        from dit.models.vae_folder import vae_geometry

        if self.family != "ours":
            return tuple(vae_geometry(self.family, self.pretrained, self.family_config))
        channels = self.latent_channels
        if self.checkpoint and Path(self.checkpoint, "vae.json").is_file():  # the trained VAE's own size
            channels = json.loads(Path(self.checkpoint, "vae.json").read_text()).get("latent_channels", channels)
        return channels, TEMPORAL, SPATIAL


@dataclass
class TextConfig:
    # minilm (packaged, offline) | hf (a local folder) | hunyuan (HunyuanVideo's Llama + CLIP pair) | hunyuan15
    # (HunyuanVideo 1.5's Qwen2.5-VL + ByT5 pair) | flux (FLUX.1's T5 + CLIP pair) | sd3 (Stable Diffusion 3's T5 +
    # CLIP-L + CLIP-G) | zimage (Z-Image's Qwen3) | qwenimage (Qwen-Image's Qwen2.5-VL) | none
    encoder: str = "minilm"
    # local Hugging Face folder for encoder=hf; hunyuan: the Llama one (text_encoder/); flux: the T5 (text_encoder_2/);
    # sd3: the T5 (text_encoder_3/); zimage, qwenimage, hunyuan15: its Qwen (text_encoder/)
    path: str | None = None
    # hunyuan: the CLIP text encoder folder (text_encoder_2/, tokenizer_2/ beside); flux: its CLIP (text_encoder/);
    # sd3: its CLIP-L (text_encoder/); hunyuan15: its ByT5 (text_encoder_2/, tokenizer_2/ beside)
    path_2: str | None = None
    path_3: str | None = None  # sd3: its CLIP-G (text_encoder_2/)
    # hunyuan, qwenimage, hunyuan15: the prompt template's tokens, cut off the states; null: the pipeline's (95, 34,
    # 108)
    crop_start: int | None = None
    max_length: int = 32  # tokens per prompt (padded): Wan 512, CogVideoX 226, LTX 128
    padding: str = "mask"  # mask: the encoder masks the padding | zeros: and its states are zeros (Wan) | unmasked:
    #                        the encoder sees the padding (CogVideoX, LTX); as each pipeline's _get_t5_prompt_embeds
    clean: bool = False  # WanPipeline's prompt_clean (HTML unescape, whitespace collapsed) before tokenizing
    dtype: str = "fp32"  # the frozen encoder's weights: fp32 | bf16 | fp16 (the pipelines' T5 / UMT5 run in bf16)
    # auto: on the training device | cpu: held and run in host memory (Wan's --t5_cpu), its states moved to the
    # device; with latent shards that store the text states it runs only for "" and the sample prompts
    device: str = "auto"
    # a folder that keeps each prompt's states (dit/models/text_cache.py): a run whose prompts are all there never
    # loads the encoder (with latent shards: "" and the sample prompts); null: none
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _check(self.encoder in TEXT_ENCODERS, "text.encoder", f"must be one of {', '.join(TEXT_ENCODERS)}")
        _check(self.encoder in ("minilm", "none") or bool(self.path), "text.path",
               f"text.encoder={self.encoder} needs text.path=/local/folder/of/a/huggingface/encoder")
        clip = {"hunyuan": "/local/HunyuanVideo/text_encoder_2", "flux": "/local/FLUX.1-dev/text_encoder",
                "sd3": "/local/stable-diffusion-3.5-large/text_encoder",
                "hunyuan15": "/local/HunyuanVideo-1.5-480p_t2v/text_encoder_2"}
        _check(self.encoder not in clip or bool(self.path_2), "text.path_2",
               f"text.encoder={self.encoder} needs text.path_2={clip.get(self.encoder)} (its "
               f"{'ByT5' if self.encoder == 'hunyuan15' else 'CLIP'} text encoder)")
        _check(self.path_2 is None or self.encoder in clip, "text.path_2",
               "is for text.encoder=hunyuan, hunyuan15, flux or sd3")
        _check(self.encoder != "sd3" or bool(self.path_3), "text.path_3", "text.encoder=sd3 needs text.path_3="
               "/local/stable-diffusion-3.5-large/text_encoder_2 (its CLIP-G text encoder)")
        _check(self.path_3 is None or self.encoder == "sd3", "text.path_3", "is for text.encoder=sd3")
        _check(self.encoder not in ("flux", "sd3") or self.padding == "unmasked", "text.padding",
               f"text.encoder={self.encoder} runs T5 over the padding, as its pipeline does: set text.padding=unmasked")
        _check(self.crop_start is None or self.crop_start >= 0, "text.crop_start", "must be >= 0 or null")
        _check(self.max_length >= 1, "text.max_length", "must be >= 1")
        _check(self.padding in ("mask", "zeros", "unmasked"), "text.padding",
               "must be mask, zeros (Wan) or unmasked (CogVideoX, LTX)")
        _check(self.dtype in FROZEN_DTYPES, "text.dtype", f"must be one of {', '.join(FROZEN_DTYPES)}, got "
               f"{self.dtype!r}")
        _check(self.device in ("auto", "cpu"), "text.device", f"must be auto (the training device) or cpu, got "
               f"{self.device!r}")


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | scaled_linear
    num_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    snr_shift_scale: float = 1.0  # SNR / scale at every step (CogVideoX-2B trains at 3.0), before zero_terminal_snr
    prediction: str = "eps"  # eps | v
    prompt_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0; None: off
    # diffusion: the discrete schedule above, eps / v targets; flow: rectified flow x_t = (1 - σ) x0 + σ ε, the model
    # predicts ε - x0 at timestep σ·1000 (dit/diffusion/flow.py); the schedule fields and prediction are then unused.
    objective: str = "diffusion"  # diffusion | flow
    timestep_sampling: str = "uniform"  # flow: σ before the shift ~ uniform | logit_normal | mode (SD3)
    logit_mean: float = 0.0  # logit_normal: σ = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode: the SD3 mode density's scale (0: uniform)
    shift: float = 1.0  # flow: static shift σ' = shift·σ / (1 + (shift - 1)·σ); > 1 trains (and samples) noisier
    dynamic_shift: bool = False  # flow: shift by latent token count instead: σ' = e^mu / (e^mu + 1/σ - 1), with
    base_shift: float = 0.5  # mu = base_shift at base_seq_len tokens, max_shift at max_seq_len, linear between
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    shift_terminal: float | None = None  # flow sampling: stretch the shifted σ grid to end here (LTX-Video: 0.1)
    timestep_spacing: str | None = None  # ddim / dpm_solver: leading | trailing (CogVideoX) | linspace; None: theirs
    # flow sampling: table (diffusers' default) | steps (linspace(1, 1/N, N): LTXPipeline, HunyuanVideoPipeline)
    flow_grid: str = "table"
    # flow training: only noise levels σ (after the shift) in [sigma_min, sigma_max], drawn by the same law restricted
    # there; one expert of Wan 2.2 A14B: [boundary, 1] for the high-noise one, [0, boundary] for the low-noise one
    sigma_min: float = 0.0
    sigma_max: float = 1.0

    def __post_init__(self) -> None:
        _check(0.0 <= self.sigma_min < self.sigma_max <= 1.0, "diffusion.sigma_min",
               f"and diffusion.sigma_max must satisfy 0 <= sigma_min < sigma_max <= 1, got {self.sigma_min} and "
               f"{self.sigma_max}")
        _check(self.schedule in ("linear", "cosine", "scaled_linear"), "diffusion.schedule",
               "must be linear, cosine or scaled_linear")
        _check(self.prediction in ("eps", "v"), "diffusion.prediction", "must be eps or v")
        _check(self.num_timesteps >= 2, "diffusion.num_timesteps", "must be >= 2")
        _check(self.snr_shift_scale > 0, "diffusion.snr_shift_scale", "must be > 0 (1: no shift)")
        _check(0.0 <= self.prompt_dropout <= 1.0, "diffusion.prompt_dropout", "must be in [0, 1]")
        _check(self.min_snr_gamma is None or self.min_snr_gamma > 0, "diffusion.min_snr_gamma", "must be > 0 or null")
        _check(self.objective in ("diffusion", "flow"), "diffusion.objective", "must be diffusion or flow")
        _check(self.timestep_sampling in ("uniform", "logit_normal", "mode"), "diffusion.timestep_sampling",
               "must be uniform, logit_normal or mode")
        _check(self.logit_std > 0, "diffusion.logit_std", "must be > 0")
        _check(0 <= self.mode_scale <= 1.75, "diffusion.mode_scale",
               "must be in [0, 1.75] (above 1/(pi/2 - 1) = 1.75 the mode density's map leaves [0, 1])")
        _check(self.shift > 0, "diffusion.shift", "must be > 0 (1: no shift)")
        _check(self.shift_terminal is None or 0 < self.shift_terminal < 1, "diffusion.shift_terminal",
               "must be in (0, 1) or null")
        _check(self.flow_grid in ("table", "steps"), "diffusion.flow_grid", "must be table or steps")
        _check(self.timestep_spacing in (None, "leading", "trailing", "linspace"), "diffusion.timestep_spacing",
               "must be leading, trailing, linspace or null (each sampler's default)")
        _check(1 <= self.base_seq_len < self.max_seq_len, "diffusion.base_seq_len",
               f"must be >= 1 and below diffusion.max_seq_len ({self.max_seq_len})")
        _check(not (self.dynamic_shift and self.shift != 1.0), "diffusion.shift",
               f"is {self.shift} but diffusion.dynamic_shift=true replaces the static shift: leave shift at 1.0")
        if self.objective == "flow":
            _check(self.prediction == "eps", "diffusion.prediction",
                   f"is {self.prediction!r}, but diffusion.objective=flow always predicts the velocity ε - x0: "
                   "drop diffusion.prediction")
            _check(self.min_snr_gamma is None, "diffusion.min_snr_gamma",
                   "is for diffusion.objective=diffusion (eps / v targets); set it to null for flow")
        else:
            flow_only = {"timestep_sampling": self.timestep_sampling != "uniform", "shift": self.shift != 1.0,
                         "dynamic_shift": self.dynamic_shift,
                         "sigma_min": self.sigma_min != 0.0, "sigma_max": self.sigma_max != 1.0}
            for key, changed in flow_only.items():
                _check(not changed, f"diffusion.{key}",
                       "is only used by the flow objective: set diffusion.objective=flow or drop it")


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the denoiser's linear layers; only they train (dit/models/lora.py)."""

    rank: int = 0  # 0: off (full fine-tuning or training from scratch)
    alpha: float | None = None  # the update is (alpha / rank) B A; None: alpha = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] | None = None  # module-name regexes (full match); None: every block's attention and MLP
    # auto: under DDP in a bf16 run the blocks' frozen linear layers are held in bf16 (autocast computes them in bf16
    # anyway: the same numbers, half the bytes; DeepSpeed's bf16 holds the whole model in bf16 itself); fp32: as loaded;
    # fp8 (DDP only): their weights as float8 e4m3 with a scale per row, a quarter of fp32's bytes, dequantized at
    # each call (dit/models/fp8.py; the modulation layers as auto holds them). Not the same numbers: e4m3 keeps 3
    # mantissa bits (a weight moves by up to 1/16 of itself)
    base_dtype: str = "auto"
    # an adapter to start from instead of B = 0 (continue training one): a LoRA run or checkpoint of ours, or a LoRA
    # file of any layout `dit sample --lora` reads (diffusers', ComfyUI's, musubi-tuner's, kohya's). Its modules are
    # the targets unless train.lora.targets names others; train.lora.rank must be its rank
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check(self.rank >= 0, "train.lora.rank", f"must be >= 0 (0: no LoRA), got {self.rank}")
        _check(self.init_from is None or self.rank > 0, "train.lora.init_from",
               "continues training an adapter: set train.lora.rank to its rank")
        _check(self.base_dtype in ("auto", "fp32", "fp8"), "train.lora.base_dtype", f"must be auto, fp32 or fp8, got "
               f"{self.base_dtype!r}")
        _check(self.base_dtype != "fp8" or self.rank > 0, "train.lora.base_dtype",
               "fp8 holds a LoRA run's frozen base in fp8: set train.lora.rank >= 1, or base_dtype=auto")
        _check(self.alpha is None or self.alpha > 0, "train.lora.alpha", "must be > 0 or null (= rank)")
        _check(0.0 <= self.dropout < 1.0, "train.lora.dropout", "must be in [0, 1)")
        _check(self.targets is None or self.rank > 0, "train.lora.targets",
               "set train.lora.rank >= 1 to train adapters on them (rank 0 is full fine-tuning)")
        _check(self.targets is None or (len(self.targets) > 0 and all(self.targets)), "train.lora.targets",
               "must be a non-empty list of module-name patterns, or null for the defaults")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def base_in_bf16(self, precision: str, strategy: str) -> bool:
        """Whether the run holds the blocks' frozen linear layers in bf16 (base_dtype; with fp8, those it does not
        hold in fp8): a LoRA run in ``precision`` bf16 under ``strategy`` DDP, the one strategy that keeps the base
        whole in the dtype we give it."""
        return bool(self.rank) and self.base_dtype in ("auto", "fp8") and precision == "bf16" and strategy == "ddp"

    @property
    def base_in_fp8(self) -> bool:
        """Whether the run holds the blocks' frozen linear weights in fp8 (dit/models/fp8.py; DDP only)."""
        return bool(self.rank) and self.base_dtype == "fp8"

    def ema_shares_base(self, strategy: str) -> bool:
        """Whether the EMA shares the model's frozen base (a LoRA run under DDP / ZeRO): FSDP shards a copy of it
        with the EMA instead (dit/training/ema.py)."""
        return bool(self.rank) and strategy in ("ddp", "zero1", "zero2", "zero3")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "constant"  # constant | cosine (after the linear warmup, down to 5% of lr at train.steps)
    grad_clip: float = 1.0
    # AdamW as one fused kernel per parameter group (torch's fused=True; CPU and CUDA): the same update up to float
    # rounding, less optimizer time (BENCHMARKS.md). train.strategy=ddp only: not tried under DeepSpeed or FSDP.
    fused_adamw: bool = False
    # an EMA of the weights (what checkpoints export and samples are drawn with), decay ema_decay; false: the live
    # weights are exported, sampled and validated, and the EMA's memory is saved (4 bytes per trained parameter on
    # each GPU under DDP, 1/N of that under ZeRO and FSDP)
    ema: bool = True
    ema_decay: float = 0.999
    mixed_precision: str = "auto"  # auto (bf16 where supported, else fp32) | bf16 | fp16 | no
    output_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3
    sample_every: int = 0  # steps between sample clips in TensorBoard (0: only at the end)
    # Validation loss on data.val_shards (dit/training/validation.py): the first val_samples clips, each at val_levels
    # fixed noise levels with fixed noise, at step 0, every val_every steps (0: at each checkpoint) and at the end
    val_every: int = 0
    val_samples: int = 32
    val_levels: int = 4
    # also the EMA's validation loss (the weights checkpoints export and samples are drawn with): val_loss_ema
    val_ema: bool = True
    # keep the checkpoint of the lowest validation loss (at a checkpoint step; the EMA's with val_ema) beside the last
    # keep_last ones; RUN/best.json names it
    keep_best: bool = False
    sample_prompts: list[str] = field(default_factory=list)
    # image-to-video (model.condition=first_frame): the first frame of each sample prompt's clip (image files, one per
    # prompt), resized and center-cropped to the training size; none: the logged clips are drawn from text alone
    sample_images: list[str] = field(default_factory=list)
    # a run that trains one expert of two (Wan 2.2 A14B; diffusion.sigma_min / sigma_max): the other one (its run,
    # checkpoint or diffusers transformer folder), with which the logged clips are drawn; held on the CPU in the
    # samples' precision, on the device only while sampling. Empty: such a run logs no clips
    sample_expert: str = ""
    # Distributed strategy (dit/distributed/strategies.py); the launcher (torchrun / accelerate launch) sets N.
    strategy: str = "ddp"  # ddp | zero1 | zero2 | zero3 | fsdp
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step (every strategy)
    offload_optimizer: bool = False  # zero1/2/3: optimizer states (and their update) on the CPU
    offload_params: bool = False  # zero3 / fsdp: parameters on the CPU between uses
    fsdp_shard: str = "full"  # fsdp: full (shard over all ranks) | hybrid (shard within a node, replicate across)
    # Sequence parallelism (dit/distributed/sequence.py): each clip's tokens split over this many consecutive ranks
    # (all-to-all over heads, DeepSpeed-Ulysses); the strategy is data parallel over world / sequence_parallel.
    sequence_parallel: int = 1
    deepspeed_config: str | None = None  # a DeepSpeed JSON instead of configs/deepspeed/zero{N}.json
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir, if any) | never | a checkpoint dir
    max_nonfinite: int = 10  # stop after this many steps in a row with a non-finite loss or gradient norm
    parity_batch: bool = False  # tests: every rank draws the whole global batch like 1 process and keeps its slice
    watchdog_timeout: float = 600.0  # log the stuck rank, phase and stack when one phase lasts longer (0: off)
    # Fine-tuning: a new run from trained weights (weights only: fresh optimizer, LR schedule, step 0), from a run or
    # checkpoint directory of ours or a family's diffusers transformer folder; train.resume continues a run instead.
    init_from: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", "must be >= 1")
        _check(self.strategy in STRATEGIES, "train.strategy",
               f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        _check(not self.strategy.startswith("zero") or _installed("deepspeed"), "train.strategy",
               f"{self.strategy} needs DeepSpeed: pip install deepspeed (or pip install '.[deepspeed]')")
        _check(not self.offload_optimizer or self.strategy.startswith("zero"), "train.offload_optimizer",
               "needs train.strategy=zero1, zero2 or zero3")
        _check(not self.offload_params or self.strategy in ("zero3", "fsdp"), "train.offload_params",
               "needs train.strategy=zero3 or fsdp (the strategies that shard parameters)")
        _check(self.fsdp_shard in ("full", "hybrid"), "train.fsdp_shard", "must be full or hybrid")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _check(self.sequence_parallel >= 1, "train.sequence_parallel", "must be >= 1 (1: off)")
        _check(not (self.strategy == "fsdp" and self.mixed_precision == "fp16"), "train.mixed_precision",
               "fp16 is not supported with train.strategy=fsdp (no loss scaling there); use bf16")
        _check(self.deepspeed_config is None or Path(self.deepspeed_config).is_file(), "train.deepspeed_config",
               f"file {self.deepspeed_config!r} does not exist (see configs/deepspeed/)")
        _check(self.deepspeed_config is None or self.strategy.startswith("zero"), "train.deepspeed_config",
               "only used with train.strategy=zero1, zero2 or zero3")
        _check(self.resume in ("auto", "never") or Path(self.resume).is_dir(), "train.resume",
               f"must be auto, never or an existing checkpoint directory; {self.resume!r} is none of these")
        _check(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
        _check(self.init_from is None or Path(self.init_from).is_dir(), "train.init_from",
               f"{self.init_from!r} is not a directory: point it at a run or checkpoint directory of dit, or at a "
               "family's diffusers transformer folder")
        _check(self.watchdog_timeout >= 0, "train.watchdog_timeout", "must be >= 0 seconds (0: off)")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.lr_schedule in ("constant", "cosine"), "train.lr_schedule",
               f"unknown schedule {self.lr_schedule!r}; choose constant or cosine")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
        _check(not (self.lora.base_in_fp8 and self.strategy != "ddp"), "train.lora.base_dtype",
               f"fp8 is for train.strategy=ddp (DeepSpeed and FSDP hold the base in their own dtype); with "
               f"{self.strategy} set train.lora.base_dtype=auto")
        _check(not (self.fused_adamw and self.strategy != "ddp"), "train.fused_adamw",
               f"is tried with train.strategy=ddp only; with {self.strategy} set train.fused_adamw=false")
        _check(self.mixed_precision in ("auto", "bf16", "fp16", "no"), "train.mixed_precision",
               "must be auto, bf16, fp16 or no")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.val_every >= 0, "train.val_every", "must be >= 0 (0: at each checkpoint)")
        _check(self.val_samples >= 1, "train.val_samples", "must be >= 1")
        _check(self.val_levels >= 1, "train.val_levels", "must be >= 1")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")


@dataclass
class SampleConfig:
    # ddim | ddpm | dpm_solver | cogvideox_dpm (objective diffusion) | flow_euler | flow_dpm_solver | flow_unipc
    # (objective flow);
    # null: the objective's default, ddim or flow_euler
    sampler: str | None = None
    steps: int = 50
    cfg: float = 5.0
    eta: float = 0.0
    fps: int = 8
    shift: float | None = None  # flow samplers: a static shift; null: the training one (diffusion.shift / dynamic)
    cfg_low: float | None = None  # with two experts (`dit sample --expert`): the low-noise one's scale; null: cfg
    # CogVideoX's use_dynamic_cfg: the scale at timestep t is 1 + cfg (1 - cos(π ((steps - t) / steps)^5)) / 2, as
    # CogVideoXPipeline computes it (its official 5B / 1.5 sampling turns it on)
    dynamic_cfg: bool = False
    # a guidance-distilled HunyuanVideo or FLUX.1-dev: the embedded guidance scale its transformer is given; null: the
    # pipeline's, 6.0 (HunyuanVideoPipeline) or 3.5 (FluxPipeline) (its sample.cfg is then 1: no unconditional pass)
    guidance: float | None = None

    def __post_init__(self) -> None:
        _check(self.cfg_low is None or self.cfg_low >= 0, "sample.cfg_low", "must be >= 0 or null (sample.cfg)")
        _check(self.sampler in (None, "ddim", "ddpm", "dpm_solver", "cogvideox_dpm", "flow_euler", "flow_dpm_solver",
                                "flow_unipc"), "sample.sampler",
               "must be ddim, ddpm, dpm_solver, cogvideox_dpm (diffusion), flow_euler, flow_dpm_solver, flow_unipc "
               "(flow) or null")
        _check(self.steps >= 1, "sample.steps", "must be >= 1")
        _check(self.cfg >= 0, "sample.cfg", "must be >= 0")
        _check(not self.dynamic_cfg or self.cfg > 1, "sample.dynamic_cfg",
               f"raises the guidance scale above 1 over the steps: set sample.cfg > 1 (it is {self.cfg:g})")
        _check(self.shift is None or self.shift > 0, "sample.shift", "must be > 0 or null (the training shift)")
        _check(self.guidance is None or self.guidance >= 0, "sample.guidance",
               "must be >= 0 or null (the pipeline's)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        pt, ph, pw = self.patch_size()
        _, temporal, spatial = self.vae.geometry()  # the chosen VAE's compression: its frame and size rule
        ft = self.frame_patch()  # (1 where the model pads the latent frames its temporal patch does not divide)
        for name, problem in size_problems(self.data.frames, self.data.height, self.data.width, patch=(ft, ph, pw),
                                           temporal=temporal, spatial=spatial).items():  # the DiT's patch on it
            _check(False, f"data.{name}", problem)
        b = self.data.buckets
        if b.enabled:  # bucket shapes must be ones the DiT can patchify, and token counts use its patch
            _check(list(b.patch) == [pt, ph, pw], "data.buckets.patch",
                   f"{list(b.patch)} differs from the model's patch size {[pt, ph, pw]}; set data.buckets.patch="
                   f"{[pt, ph, pw]}")
            m = spatial * math.lcm(ph, pw)
            _check(b.multiple % m == 0, "data.buckets.multiple",
                   f"{b.multiple} is not a multiple of {m} ({spatial} x the spatial patch); nearest valid: "
                   f"{nearest_multiple(b.multiple, m)}")
            bad = {f: frames_problem(f, temporal=temporal, patch=ft) for f in b.frames}  # the VAE's rule, the patch
            bad = {f: problem for f, problem in bad.items() if problem}
            _check(not bad, "data.buckets.frames", f"{list(bad)}: {'; '.join(bad.values())}")
        if self.train.sequence_parallel > 1:
            self._check_sequence_parallel(temporal, spatial)
        _check(not (self.model.fused_qkv and self.train.lora.rank), "model.fused_qkv",
               "cannot be combined with LoRA (train.lora.rank > 0): the adapters target the plain q and kv layers, "
               "which fusing replaces; set model.fused_qkv=false")
        check_family_run(self)
        self._check_sample_images()
        self._check_sample_expert()
        _check(not self.train.keep_best or bool(self.data.val_shards), "train.keep_best",
               "keeps the checkpoint of the lowest validation loss: set data.val_shards (held-out shards)")

    def _check_sample_images(self) -> None:
        """train.sample_images: one existing image per sample prompt, for an image-to-video model."""
        images, prompts = self.train.sample_images, self.train.sample_prompts
        if not images:
            return
        _check(self.model.condition == "first_frame", "train.sample_images",
               "are first frames for an image-to-video model: set model.condition=first_frame, or remove them")
        _check(len(images) == len(prompts), "train.sample_images",
               f"has {len(images)} images for {len(prompts)} train.sample_prompts: give one first frame per prompt")
        missing = [p for p in images if not Path(p).is_file()]
        _check(not missing, "train.sample_images", f"{missing} do not exist: give image files (png, jpg, webp)")

    def _check_sample_expert(self) -> None:
        """train.sample_expert: an existing path, for a run of one expert that logs clips."""
        expert = self.train.sample_expert
        if not expert:
            return
        d = self.diffusion
        _check(d.sigma_min > 0.0 or d.sigma_max < 1.0, "train.sample_expert",
               "is the other expert of a run that trains one of two, but this run trains every noise level "
               "(diffusion.sigma_min=0, sigma_max=1): remove it")
        _check(bool(self.train.sample_prompts), "train.sample_expert",
               "draws the logged clips with this run's expert, but train.sample_prompts is empty: add prompts or "
               "remove it")
        _check(Path(expert).exists(), "train.sample_expert",
               f"{expert!r} does not exist: give the other expert's run, checkpoint directory or diffusers "
               "transformer folder")

    def _check_sequence_parallel(self, temporal: int, spatial: int) -> None:
        """Heads and the clip's tokens must split evenly over the sequence-parallel ranks (bucketed or latent-shard
        shapes are checked per batch, when they arrive)."""
        from dit.models.presets import PRESETS

        sp, m = self.train.sequence_parallel, self.model
        # stochastic depth draws its per-sample mask on each rank: the ranks of a group would drop different tokens
        _check(m.drop_path == 0, "model.drop_path", "must be 0 with train.sequence_parallel > 1")
        if m.family != "dit":
            from dit.models.families import FAMILIES, family_config

            heads = FAMILIES[m.family].sizes(family_config(m.family, m.pretrained, m.family_config))["num_heads"]
        else:
            heads = m.num_heads or PRESETS[m.preset]["num_heads"]
        _check(heads % sp == 0, "train.sequence_parallel",
               f"{sp} does not divide the model's {heads} attention heads (model.num_heads): use one of "
               f"{[n for n in range(1, heads + 1) if heads % n == 0]}, or a model whose heads it divides")
        (pt, ph, pw), d = self.patch_size(), self.data
        grid = -(-((d.frames - 1) // temporal + 1) // pt), d.height // spatial // ph, d.width // spatial // pw
        tokens = math.prod(grid)
        _check(d.buckets.enabled or tokens % sp == 0, "train.sequence_parallel",
               f"{sp} does not divide the {tokens} latent tokens of a clip (grid {'x'.join(map(str, grid))} from "
               f"data.frames={d.frames}, height={d.height}, width={d.width}): use one of "
               f"{[n for n in range(1, min(tokens, 64) + 1) if tokens % n == 0]}, or a clip size whose token "
               f"count {sp} divides")

    def patch_size(self) -> tuple[int, int, int]:
        from dit.models.presets import PRESETS

        p = self.model.patch_size or PRESETS[self.model.preset]["patch_size"]
        return int(p[0]), int(p[1]), int(p[2])

    def frame_patch(self) -> int:
        """The temporal patch the frame rule divides by: 1 for a model that pads its latent frames instead
        (CogVideoX 1.5: dit/models/families ``frame_pad``)."""
        from dit.models.families import pads_frames

        return 1 if pads_frames(self.model.family) else self.patch_size()[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (simple types only), converting int -> float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if key.endswith("mixed_precision") and value is False:  # YAML reads the documented value `no` as false
            return "no"
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key,
               f"expected a string, got {value!r} (YAML reads yes/no/on/off as booleans: quote the value)")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _check(isinstance(value, dict), full, "expected a mapping")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        _check(isinstance(node, dict), dotted, f"{p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=200", "data.shards=a/{0..3}.tar"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=200)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)) or (value is not None and not isinstance(value, (int, float, bool, str, list))):
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; "
                              "pass --config configs/tiny.yaml or another YAML file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:  # a user's typo: one line naming the file and where, not a parser traceback
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML ({getattr(e, 'problem', None) or e}, at"
                              f"{where or ' an unknown place'}); fix that line (compare configs/tiny.yaml)") from None
        _check(isinstance(data, dict), str(p), "a config file must be a YAML mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
