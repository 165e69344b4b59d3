"""`dit plan`: per-GPU memory of a training config under each strategy, before anything is launched.

    dit plan --config configs/tiny.yaml --gpus 8 --gpu-memory 80

Bytes per trainable parameter under DDP and FSDP (fp32 weights, as autocast keeps them): weights 4, gradients 4 (DDP's
are views into its all-reduce buckets), AdamW's two moments 8, the EMA copy 4 (none with train.ema=false). FSDP shards
all of them over the ranks and gathers two blocks at a time (in bf16 in a bf16 run: its mixed precision policy).
DeepSpeed holds the module in the run's half dtype (2 bytes; fp32 runs 4) and 12 bytes of fp32 master weights and
moments over the ranks (ZeRO-1: gradients whole until the backward ends; ZeRO-2: reduced per bucket into the partition;
ZeRO-3: weights and gradients partitioned too), plus its reduce bucket (reduce_bucket_size elements of the DeepSpeed
JSON); offload moves the optimizer (and ZeRO-3's weights) to host memory. Its EMA is partitioned like the masters (4
bytes over the ranks) and filled in whole, in the samples' precision, only while samples or the EMA's validation read it
(ZeRO-3 then gathers a LoRA run's shared base too, a block at a time): that can set the peak instead of a training step.
With train.sample_expert (one expert of a pair that logs clips) the other expert, of the same size, is on the GPU while
they are drawn (2 bytes per parameter in a bf16 run, else 4). Under DDP in a half-precision run autocast's half copies
of the weights live from the forward to the backward (2 bytes per trained parameter).
Activations follow the DiT block (adaLN-Zero self-attention, cross-attention to the text, MLP): about
ACTIVATIONS[family] x hidden values per token per block are kept for backward (scores are not stored with SDPA's
fused kernels), or one hidden vector per token per block plus one block's worth with activation
checkpointing (model.gradient_checkpointing_every=k: the other blocks keep all of theirs). The frozen VAE and
text encoder count once per GPU, in vae.dtype and text.dtype (the text encoder not at all with text.device=cpu).
The optimizer step briefly needs one more fp32 copy of its shard (foreach temporaries; DeepSpeed 8 bytes per
trained parameter of its partition), which can set the peak when activations are small.
The totals are tensor bytes, what ``torch.cuda.max_memory_allocated`` reports; "fits" leaves 1 - HEADROOM of the
GPU for the CUDA context, kernel workspaces and the caching allocator's fragmentation.
With train.sequence_parallel=SP each rank keeps the activations of 1/SP of every clip's tokens (attention too: all
tokens for 1/SP of the heads); parameters, gradients and optimizer state are unchanged (the strategies shard over
all ranks, whatever SP is), and the text's keys and values are computed on every rank (CogVideoX's whole text stream,
which joins the clip's tokens in every block).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dit.config import STRATEGIES, Config, ConfigError, ModelConfig, VAEConfig
from dit.models.condition import clip_condition, condition_replaces
from dit.models.diffusers_folder import DTYPE_BYTES
from dit.models.families import FAMILIES
from dit.models.text_pooled import CLIP_LENGTH

# By model family: (hidden-size values per token that a block keeps for backward, bytes per value under bf16
# autocast: over 2 where the blocks keep fp32 intermediates, as diffusers' Wan and LTX do). Fitted to the peak tensor
# bytes of real training steps (tests/training/measure_memory.py; figures in BENCHMARKS.md), autocast's bf16 copies
# of the weights counted apart.
# CogVideoX's per-token figure counts its text tokens too (JOINT_TEXT).
ACTIVATIONS = {"dit": (30.0, 2.0), "wan": (30.0, 2.8), "ltx": (30.0, 2.8), "cogvideox": (24.0, 2.0),
               "hunyuan": (24.0, 2.6), "flux": (22.5, 2.4), "sd3": (25.5, 2.4),
               "zimage": (34.0, 3.4), "qwenimage": (24.0, 2.4), "hunyuan15": (24.0, 2.4)}
# SD3.5's second self-attention over the image alone (dual_attention_layers): values per image token it adds to a
# block (measured as ACTIVATIONS, tests/training/test_plan.py)
IMAGE_ATTENTION = 11.0
# Families whose text tokens run through every block beside the clip's (CogVideoX): the text is whole on every
# sequence-parallel rank.
JOINT_TEXT = frozenset(name for name, cls in FAMILIES.items() if cls.joint_text)
SIGLIP_TOKENS = 729  # HunyuanVideo 1.5 I2V: the SigLIP tokens of an image (its pipeline's vision_num_semantic_tokens)
HEADROOM = 0.9  # "fits": total <= 90% of the GPU (a margin, not measured here: no GPU has run the plan's configs)
OUTSIDE_BLOCKS = 12  # patch embedding, final layer, loss terms: values per token (in hidden units, or channels)
# Per-token timesteps (Wan and LTX with model.condition=first_frame): bytes per token per hidden unit that each
# block keeps for its backward (its fp32 [6, D] modulation sum and the scales made from it), and that the step holds
# once (the per-token timestep embeddings and their gradient), in fp32 and bf16 runs alike: measured beside the same
# runs without the condition, Wan and LTX alike (tests/training/measure_memory.py; BENCHMARKS.md).
PER_TOKEN_TEMB = (34.0, 41.0)
MINILM = (22_713_216, 384)  # the packaged all-MiniLM-L6-v2: parameters, output dim


@dataclass
class ModelSize:
    params: int  # trainable denoiser parameters (our DiT or a family's transformer)
    frozen: int  # VAE + text encoder parameters
    hidden: int
    depth: int
    heads: int
    tokens: int  # latent tokens per sample
    text_len: int
    base: int = 0  # LoRA: the denoiser's own (frozen) parameters, held beside the adapter; params is the adapter
    base_linear: int = 0  # LoRA: those of the blocks' linear layers (bf16 under DDP in a bf16 run: lora.base_dtype)
    base_fp8: int = 0  # the weights of those an fp8 base holds in fp8 (lora.base_dtype=fp8: dit/models/fp8.py)
    base_fp8_rows: int = 0  # their output rows (one fp32 scale each)
    base_gathered: int = 0  # LoRA: what ZeRO-3 gathers of the base at once while sampling: the largest block + the rest
    read_whole: int = 0  # trained parameters whole at once while DeepSpeed reads the EMA: the largest block + the rest
    frozen_bytes: float = 0.0  # the VAE and text encoder in their dtypes (vae.dtype, text.dtype), the buffers
    buffers: int = 0  # the denoiser's buffers (fp32 position tables: SD3's, CogVideoX's), on every rank
    image_attention: int = 0  # blocks with a second self-attention over the image alone (SD3.5's dual attention)
    # tokens x blocks of the refiners beside the main blocks: over the text alone (HunyuanVideo's token refiner,
    # Z-Image's context refiner) and over the image alone (Z-Image's noise refiner)
    refiner_tokens: int = 0


@dataclass
class Estimate:
    strategy: str
    weights: float  # bytes per GPU
    grads: float
    optimizer: float
    ema: float
    buffers: float  # DeepSpeed's gradient reduce bucket (configs/deepspeed: reduce_bucket_size)
    activations: float
    frozen: float
    total: float
    fits: bool


def text_folders(cfg: Config) -> list[str]:
    """The text encoder folders of text.encoder: text.path, and the CLIP ones of hunyuan, flux (path_2) and sd3
    (path_2, path_3); none for minilm (packaged) and none."""
    t = cfg.text
    return {"hf": [t.path], "zimage": [t.path], "qwenimage": [t.path], "hunyuan": [t.path, t.path_2],
            "hunyuan15": [t.path, t.path_2],
            "flux": [t.path, t.path_2], "sd3": [t.path, t.path_2, t.path_3]}.get(t.encoder, [])


def _encoder(config: object, projection: bool = False) -> torch.nn.Module:
    """The text encoder a config describes, as dit loads it (a T5's encoder alone: AutoModel adds the decoder;
    ``projection``: a CLIP with its text projection, as SD3's are loaded)."""
    from transformers import CLIPTextModelWithProjection

    from dit.models.text import encoder_class

    cls = CLIPTextModelWithProjection if projection else encoder_class(config.model_type)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def text_encoder_size(cfg: Config) -> tuple[int, int]:
    if cfg.text.encoder == "none":
        return 0, 8
    if cfg.text.encoder == "minilm":
        return MINILM
    from transformers import AutoConfig

    # the folders here (one not downloaded yet is not counted; without the first, the family's width is used);
    folders = text_folders(cfg)
    configs = [AutoConfig.from_pretrained(f) if (Path(f) / "config.json").is_file() else None for f in folders]
    with torch.device("meta"):
        params = sum(p.numel() for i, c in enumerate(configs) if c is not None
                     for p in _encoder(c, projection=cfg.text.encoder == "sd3" and i > 0).parameters())
    hf = configs[0]
    return params, 0 if hf is None else int(getattr(hf, "hidden_size", getattr(hf, "d_model", 0)))


def image_encoder_size(model_cfg: ModelConfig) -> int:
    """Parameters of model.image_encoder (Wan 2.1 I2V's CLIP, HunyuanVideo 1.5's SigLIP, held in fp32), built on
    the meta device from its config; 0 without."""
    if not model_cfg.image_encoder:
        return 0
    import transformers

    from dit.models.image_encoder import VISION_CLASSES, read_image_encoder

    cls = next(c for c in VISION_CLASSES if c in read_image_encoder(model_cfg.image_encoder)["architectures"])
    with torch.device("meta"):
        enc = getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(model_cfg.image_encoder))
    return sum(p.numel() for p in enc.parameters())


def family_vae(vae_cfg: VAEConfig) -> torch.nn.Module:
    """The family's diffusers VAE built from its folder's config (or the released model's defaults, with
    vae.family_config): call it on the meta device."""
    import diffusers

    from dit.models.vae_folder import FAMILIES, family_config

    spec = FAMILIES[vae_cfg.family]
    cls = getattr(diffusers, spec.class_name)
    if vae_cfg.pretrained:
        return cls.from_config(family_config(vae_cfg.family, vae_cfg.pretrained))
    # the released sizes (the constructor's defaults, FLUX.1's over AutoencoderKL's), or another release's
    return cls(**{**spec.released, **vae_cfg.family_config})


def family_text_dim(model_cfg: ModelConfig) -> int:
    """The text width a family's transformer takes (its config's), for a text encoder not on this machine."""
    from dit.models.families import FAMILIES, family_config

    if model_cfg.family not in FAMILIES:
        return 8
    cls = FAMILIES[model_cfg.family]
    return int(family_config(model_cfg.family, model_cfg.pretrained, model_cfg.family_config)[cls.text_key])


def model_size(cfg: Config) -> ModelSize:
    """Parameter counts (built on the meta device: no memory, no weights) and tokens per sample."""
    from dit.models.families import build_denoiser
    from dit.models.vae import build_vae

    text_params, text_dim = text_encoder_size(cfg)
    image_params = image_encoder_size(cfg.model)
    channels, temporal, spatial = cfg.vae.geometry()
    with torch.device("meta"):
        vae_params = sum(p.numel() for p in (build_vae(cfg.vae) if cfg.vae.family == "ours" else
                                             family_vae(cfg.vae)).parameters())
        dit = build_denoiser(cfg.model, in_channels=channels, text_dim=text_dim or family_text_dim(cfg.model),
                             compression=(temporal, spatial), load_weights=False)  # any family, no weights
    pt, ph, pw = cfg.patch_size()
    t, h, w = (cfg.data.frames - 1) // temporal + 1, cfg.data.height // spatial, cfg.data.width // spatial
    tokens = -(-t // pt) * (h // ph) * (w // pw)  # (CogVideoX 1.5 pads an odd latent frame count at the front)
    # (SD3: its CLIP tokens too; HunyuanVideo 1.5: its image tokens, one masked one or SigLIP's 729, the ByT5 ones
    # of quoted text not counted)
    image_tokens = SIGLIP_TOKENS if cfg.model.condition == "first_frame" else 1
    text_len = cfg.text.max_length + {"sd3": CLIP_LENGTH, "hunyuan15": image_tokens}.get(cfg.text.encoder, 0)
    buffers = sum(b.numel() for b in dit.buffers())  # (SD3.5 Medium's position table: 226M values)
    whole = sum(p.numel() for p in dit.parameters())
    lora, base, base_linear, base_fp8, base_fp8_rows, base_gathered = cfg.train.lora, 0, 0, 0, 0, 0
    if lora.rank:  # the adapter trains; the denoiser's own weights stay, frozen, in the same module
        from dit.models.lora import target_modules

        modules = dict(dit.named_modules())
        adapter = sum(lora.rank * (modules[n].in_features + modules[n].out_features)
                      for n in target_modules(dit, lora.targets))
        base = whole
        base_linear = sum(p.numel() for m in dit.blocks.modules() if isinstance(m, torch.nn.Linear)
                          for p in m.parameters(recurse=False))
        from dit.models.fp8 import fp8_candidates

        fp8 = [m for _, m in fp8_candidates(dit.blocks)]
        base_fp8, base_fp8_rows = sum(m.weight.numel() for m in fp8), sum(m.out_features for m in fp8)
    # what is whole at once while the EMA model is read block by block (dit/distributed/zero_ema.py): the largest
    # block and the rest, of the base (ZeRO-3 gathers a LoRA run's shared base) and of the trained parameters
    in_blocks = [sum(p.numel() for p in b.parameters()) for b in dit.blocks]
    read_whole = whole - sum(in_blocks) + max(in_blocks)
    if lora.rank:
        base_gathered = read_whole
        block_of = {id(m): i for i, b in enumerate(dit.blocks) for m in b.modules()}
        per_block = [0] * len(in_blocks)
        for n in target_modules(dit, lora.targets):
            m = modules[n]
            if id(m) in block_of:  # (an adapter outside the blocks is whole for the whole read)
                per_block[block_of[id(m)]] += lora.rank * (m.in_features + m.out_features)
        read_whole = adapter - sum(per_block) + max(per_block)
    return ModelSize(params=adapter if lora.rank else whole, base=base,
                     base_linear=base_linear, base_fp8=base_fp8, base_fp8_rows=base_fp8_rows,
                     base_gathered=base_gathered, read_whole=read_whole,
                     frozen=vae_params + text_params + image_params,
                     buffers=buffers,
                     frozen_bytes=vae_params * DTYPE_BYTES[cfg.vae.dtype] + image_params * DTYPE_BYTES["fp32"] +
                     buffers * DTYPE_BYTES["fp32"] +
                     # text.device=cpu: in host memory
                     (text_params * DTYPE_BYTES[cfg.text.dtype] if cfg.text.device != "cpu" else 0),
                     hidden=dit.config["hidden_size"], depth=dit.config["depth"],
                     heads=dit.config["num_heads"], tokens=tokens,
                     text_len=text_len,
                     image_attention=int(dit.config.get("image_attention_layers", 0)),
                     refiner_tokens=int(dit.config.get("refiner_layers", 0)) * text_len
                     + int(dit.config.get("image_layers", 0)) * tokens)


def activation_bytes(size: ModelSize, batch: int, family: str = "dit", half: bool = False,
                     checkpointing: bool = False, attention_scores: bool = False, sequence_parallel: int = 1,
                     checkpoint_every: int = 1, per_token_timesteps: bool = False) -> float:
    """Activations kept for the backward pass of one micro-batch on one rank, for a model ``family`` (ACTIVATIONS),
    in fp32 or, ``half``, under bf16/fp16 autocast. ``attention_scores``: the attention
    kernel stores its scores and probabilities (the math path, e.g. on CPU); fused GPU kernels do not.
    ``sequence_parallel``: the rank holds 1/SP of the tokens (and attends all tokens with 1/SP of the heads).
    ``checkpoint_every``: with ``checkpointing``, blocks 0, k, 2k, ... are recomputed (parallelize.py).
    ``per_token_timesteps``: each token has its own timestep embedding (PER_TOKEN_TEMB; the held part is computed
    for the whole clip on every sequence-parallel rank)."""
    per_token, half_bytes = ACTIVATIONS[family]
    bytes_per_value = half_bytes if half else 4.0
    tokens = size.tokens / sequence_parallel  # this rank's tokens
    if family in JOINT_TEXT:  # the whole text beside the rank's tokens; scores: H/SP heads x (N + L)^2
        stream = tokens + size.text_len
        per_block = per_token * stream * size.hidden
        scores = size.heads / sequence_parallel * (size.tokens + size.text_len) ** 2
    else:  # + the text's K/V for cross-attention; scores: H/SP heads x N x N (self) + H x N/SP x L (cross)
        stream = tokens
        per_block = per_token * tokens * size.hidden + 4 * size.text_len * size.hidden
        scores = size.heads * tokens * (size.tokens + size.text_len)
    if attention_scores:  # scores and probabilities
        per_block += 2 * scores
    recomputed = -(-size.depth // checkpoint_every) if checkpointing else 0  # blocks 0, k, 2k, ...
    kept = size.depth - recomputed  # blocks that keep their activations until their backward
    # the recomputed blocks' inputs: the residual stream, in the autocast dtype in all four families (measured)
    inputs = recomputed * stream * size.hidden * (2.0 if half else 4.0)
    live = max(kept, 1 if recomputed else 0)  # the kept blocks (or the one block being recomputed)
    blocks = live * per_block
    if size.image_attention:  # SD3.5's dual-attention blocks, their share of the live ones
        blocks += IMAGE_ATTENTION * tokens * size.hidden * live * size.image_attention / size.depth
    if size.refiner_tokens:  # refiner blocks as the main ones, over their tokens (whole on every rank), when live
        blocks += per_token * size.refiner_tokens * size.hidden * live / size.depth
    temb = 0.0
    if per_token_timesteps:
        block_bytes, held_bytes = PER_TOKEN_TEMB
        temb = (block_bytes * live * tokens + held_bytes * size.tokens) * size.hidden
    return batch * (inputs + temb + bytes_per_value * (blocks + OUTSIDE_BLOCKS * tokens * size.hidden))


def check_plan_args(gpus: int, gpu_memory_gb: float, gpus_per_node: int, sequence_parallel: int = 1) -> None:
    """The job's shape, checked before anything is built: ``ConfigError`` naming the flag and the fix."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1 (ranks in the job), got {gpus}")
    if not gpu_memory_gb > 0:
        raise ConfigError(f"--gpu-memory must be > 0 (GiB per GPU, e.g. 80), got {gpu_memory_gb}")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        lo = gpus // gpus_per_node * gpus_per_node
        raise ConfigError(f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {gpus_per_node}; use "
                          f"--gpus {lo} or {lo + gpus_per_node}, or another --gpus-per-node")
    if gpus % sequence_parallel:
        raise ConfigError(f"train.sequence_parallel={sequence_parallel} does not divide --gpus {gpus}: use a multiple "
                          f"of {sequence_parallel} GPUs, or a train.sequence_parallel that divides {gpus}")


def deepspeed_buckets(cfg: Config, strategy: str) -> tuple[int, int]:
    """From the DeepSpeed JSON of ``strategy`` (configs/deepspeed/zero{N}.json, or train.deepspeed_config): the
    elements of the gradient reduce bucket (ZeRO-1/2 allocate it at every backward, ZeRO-3 once) and, for ZeRO-3,
    of the parameters gathered at once (prefetch bucket + live parameters)."""
    from dit.distributed.strategies import deepspeed_json

    zero = json.loads(deepspeed_json(cfg.train, int(strategy[-1])).read_text()).get("zero_optimization", {})
    gathered = zero.get("stage3_prefetch_bucket_size", 5e7) + zero.get("stage3_max_live_parameters", 1e9)
    return int(zero.get("reduce_bucket_size", 5e8)), int(gathered)


def expert_bytes(cfg: Config, size: ModelSize) -> float:
    """train.sample_expert: the other expert of a pair (the same architecture) in the samples' precision (bf16 in a
    bf16 run), 0 when the run logs no clips."""
    t = cfg.train
    if not (t.sample_expert and t.sample_prompts):
        return 0.0
    bf16 = t.mixed_precision in ("bf16", "auto")  # ("auto": bf16 on a GPU)
    return (2.0 if bf16 else 4.0) * float(size.base or size.params)


def estimate(cfg: Config, gpus: int, gpu_memory_gb: float, gpus_per_node: int = 8,
             size: ModelSize | None = None, attention_scores: bool = False) -> list[Estimate]:
    """Per-GPU bytes for every strategy with ``gpus`` ranks (fp32 master weights; half-precision activations,
    ACTIVATIONS' bytes per value, when train.mixed_precision is bf16/fp16/auto, fp32 for "no")."""
    t = cfg.train
    check_plan_args(gpus, gpu_memory_gb, gpus_per_node, t.sequence_parallel)
    size = size or model_size(cfg)
    act = activation_bytes(size, t.batch_size, cfg.model.family, t.mixed_precision != "no",
                           cfg.model.gradient_checkpointing, attention_scores, t.sequence_parallel,
                           cfg.model.gradient_checkpointing_every,
                           per_token_timesteps=cfg.model.condition == "first_frame"
                           and condition_replaces(cfg.model))
    P, base = float(size.params), float(size.base)
    every = cfg.model.gradient_checkpointing_every
    kept_blocks = size.depth - (-(-size.depth // every) if cfg.model.gradient_checkpointing else 0)
    precision = "bf16" if t.mixed_precision == "auto" else t.mixed_precision  # "auto": bf16 on a GPU
    half = precision in ("bf16", "fp16")
    expert = expert_bytes(cfg, size)  # on the GPU while the clips are drawn
    out = []
    for name in STRATEGIES:
        n = max(gpus, 1)
        shard = min(n, gpus_per_node) if (name == "fsdp" and t.fsdp_shard == "hybrid") else n
        ema = 4.0 * (P if t.lora.ema_shares_base(name) else P + base) if t.ema else 0.0  # (base: 0 without LoRA)
        buffers = 0.0  # DeepSpeed's reduce bucket
        frozen = size.frozen_bytes
        if name.startswith("zero"):
            # DeepSpeed casts the whole module to the run's half dtype and keeps fp32 master weights of its
            # partition beside AdamW's moments (12 bytes per trained parameter over the ranks); its optimizer step
            # takes 8 bytes per trained parameter of the partition (its gradients, fp32 copies, temporaries)
            lp = 2.0 if half else 4.0
            shares = t.lora.ema_shares_base(name)
            ema = 4.0 * (P / n + (0.0 if shares else base)) if t.ema else 0.0  # partitioned (zero_ema.py)
            # filled in block by block while sampling and validating (bf16 in a bf16 run, else fp32)
            read = ((2.0 if precision == "bf16" else 4.0) * size.read_whole
                    + (lp * size.base_gathered if name == "zero3" and shares else 0.0)
                    if t.ema and (t.sample_prompts or (cfg.data.val_shards and t.val_ema)) else 0.0)
            bucket, gathered = deepspeed_buckets(cfg, name)
            weights, optim = lp * (P + base), 12.0 * P / n
            buffers = lp * bucket
            step_temp = 0.0 if t.offload_optimizer else 8.0 * P / n
            if t.offload_optimizer:
                optim = 0.0
            if name == "zero3":
                weights = 0.0 if t.offload_params else weights / n
                grads = lp * P / n  # the partition's gradient buffer, as the reduce bucket: allocated once
                # the gathered weights, and the gradients in flight with their reduce-scatter copies (fitted with
                # configs/deepspeed's buckets: tests/training/measure_memory.py under torchrun, BENCHMARKS.md)
                work = lp * (min(P + base, gathered) + 2 * min(P, bucket))
                total = weights + grads + optim + ema + buffers + frozen + max(act + work, step_temp, read + expert)
            else:
                # the backward holds all gradients until ZeRO-1 reduces them after it (ZeRO-2: each full bucket,
                # into its partition), beside the reduce bucket, allocated at every backward
                grads = lp * (P if name == "zero1" else min(P, bucket) + P / n)
                total = weights + optim + ema + frozen + max(act + grads + buffers, step_temp, read + expert)
        else:
            weights, grads, optim = 4.0 * (P + base), 4.0 * P, 8.0 * P
            casts = 0.0  # autocast's half copies of fp32 weights, kept for the backward
            fp8 = size.base_fp8 if t.lora.base_in_fp8 and name == "ddp" else 0
            if fp8:  # fp8 weights (1 byte) and their row scales (fp32), as train.py holds them
                weights -= 3.0 * fp8 - 4.0 * size.base_fp8_rows
            if half and name == "ddp":
                # saved for the backward by the blocks that keep their activations (recomputed blocks drop theirs:
                # the strategies' autocast keeps no cast cache); a trained weight's counted whole, as the backward's
                # peak (gradients growing beside a recomputed block) takes their place (measure_memory.py)
                frozen_fp32 = base
                if t.lora.base_in_bf16(precision, name):  # the blocks' frozen linear layers held in bf16 (train.py;
                    weights -= 2.0 * (size.base_linear - fp8)  # with fp8: the rest of them)
                    frozen_fp32 -= size.base_linear  # (fp8 layers save nothing for the backward but their codes)
                casts = 2.0 * P + 2.0 * frozen_fp32 * kept_blocks / size.depth
            if name == "fsdp":
                weights, grads, optim, ema = weights / shard, grads / shard, optim / shard, ema / shard
                if t.offload_params:
                    weights = 0.0
                # two blocks unsharded: weights gathered (in the half dtype: mp_policy) and the gradients in the
                # reduce-scatter (fp32), the block at work and the one prefetched or in flight
                casts = 2 * (P + base) / size.depth * ((2.0 if half else 4.0) + 4.0)
            step_temp = optim / 2  # one fp32 copy of the optimizer's shard during the foreach AdamW step
            total = weights + grads + optim + ema + frozen + max(act + casts, step_temp, expert)
        fits = total <= HEADROOM * gpu_memory_gb * 2**30
        out.append(Estimate(name, weights, grads, optim, ema, buffers, act, frozen, total, fits))
    return out


def checkpointing_text(on: bool, every: int) -> str:
    return "off" if not on else "on" if every == 1 else f"on for blocks 0, {every}, {2 * every}, ..."


def with_fp8_base(cfg: Config) -> Config:
    """``cfg`` with train.lora.base_dtype=fp8."""
    lora = dataclasses.replace(cfg.train.lora, base_dtype="fp8")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=lora))


def format_plan(cfg: Config, gpus: int, gpu_memory_gb: float, estimates: list[Estimate], size: ModelSize) -> str:
    gb = lambda b: f"{b / 2**30:8.2f}"
    folders = text_folders(cfg)
    missing = [f for f in folders if cfg.text.device != "cpu" and not (Path(f) / "config.json").is_file()]
    in_fp8 = f" ({size.base_fp8 / 1e6:.1f}M of its weights in fp8 under DDP)" if cfg.train.lora.base_in_fp8 else ""
    trained = (f"{size.params / 1e6:.2f}M trainable LoRA parameters (rank {cfg.train.lora.rank}) on a "
               f"{size.base / 1e6:.1f}M-parameter model{in_fp8}"
               if size.base else
               f"{size.params / 1e6:.1f}M trainable parameters")
    sp = cfg.train.sequence_parallel
    text = f" beside all {size.text_len} text tokens" if cfg.model.family in JOINT_TEXT else ""
    lines = [f"model: {trained} (hidden {size.hidden}, depth {size.depth}), "
             f"{size.frozen / 1e6:.1f}M frozen (VAE {cfg.vae.dtype} + text {cfg.text.dtype}"
             f"{' on the CPU' if cfg.text.device == 'cpu' else ''}{' + CLIP fp32' if cfg.model.image_encoder else ''}"
             f"{f' + {size.buffers / 1e6:.1f}M buffer values fp32' if size.buffers >= 1e6 else ''}"
             f"); {size.tokens} tokens/sample"
             f"{f' ({size.tokens // sp} per rank{text}: sequence parallel over {sp})' if sp > 1 else ''}, "
             f"micro-batch {cfg.train.batch_size}, activation checkpointing "
             f"{checkpointing_text(cfg.model.gradient_checkpointing, cfg.model.gradient_checkpointing_every)}",
             f"per-GPU memory in GiB with {gpus} GPUs of {gpu_memory_gb:g} GiB:",
             f"{'strategy':10}{'weights':>8}{'grads':>8}{'optim':>8}{'ema':>8}{'buffers':>8}{'activ':>8}"
             f"{'frozen':>8}{'total':>8}  fits"]
    for e in estimates:
        lines.append(f"{e.strategy:10}{gb(e.weights)}{gb(e.grads)}{gb(e.optimizer)}{gb(e.ema)}{gb(e.buffers)}"
                     f"{gb(e.activations)}{gb(e.frozen)}{gb(e.total)}  {'yes' if e.fits else 'NO'}")
    fitting = [e.strategy for e in estimates if e.fits]
    ways = [w for w, useful in (
        ("turn on model.gradient_checkpointing", not cfg.model.gradient_checkpointing),
        ("checkpoint every block (model.gradient_checkpointing_every=1)",
         cfg.model.gradient_checkpointing and cfg.model.gradient_checkpointing_every > 1),
        ("lower train.batch_size", cfg.train.batch_size > 1),
        ("split long clips over ranks (train.sequence_parallel)", gpus > 1),
        ("lower data.frames / height / width", True),
        ("offload (train.offload_optimizer / train.offload_params)", True)) if useful]
    lines.append(f"fits: {', '.join(fitting)}" if fitting else
                 f"nothing fits: {', '.join(ways[:-1])}, or {ways[-1]}")
    ddp = next((e for e in estimates if e.strategy == "ddp"), None)
    if cfg.train.lora.rank and not cfg.train.lora.base_in_fp8 and ddp is not None and not ddp.fits:
        fp8 = next(e for e in estimate(with_fp8_base(cfg), gpus, gpu_memory_gb, size=size) if e.strategy == "ddp")
        lines.append(f"with the base's weights in fp8 (train.lora.base_dtype=fp8, under DDP; 1% off in its outputs): "
                     f"ddp {fp8.total / 2**30:.2f} GiB, {'fits' if fp8.fits else 'does not fit either'}")
    if clip_condition(cfg.model) and not cfg.model.image_encoder:
        lines.append("(SigLIP image encoder not counted: set model.image_encoder to its folder)"
                     if cfg.model.family == "hunyuan15" else "(CLIP image encoder not counted: set "
                     "model.image_encoder to its folder; Wan 2.1's ViT-H/14 adds 2.35 GiB in fp32)")
    if missing:
        lines.append(f"(text encoder not counted: no config.json in {' nor '.join(missing)}; add "
                     f"{DTYPE_BYTES[cfg.text.dtype]} bytes per parameter of it: text.dtype={cfg.text.dtype})")
    if cfg.text.device == "cpu":
        lines.append("(text encoder not counted: text.device=cpu holds it in host memory)")
    if expert := expert_bytes(cfg, size):
        lines.append(f"(train.sample_expert: the other expert, {expert / 2**30:.2f} GiB, counted on "
                     "the GPU while the clips are drawn; between them it is held in host memory, once per node)")
    lines.append(f"(tensor bytes, as torch.cuda.max_memory_allocated counts them; fits: total <= {HEADROOM:.0%} "
                 "of the GPU, the rest for the CUDA context, workspaces and fragmentation)")
    if gpus == 1:
        lines.append("(1 GPU: the ZeRO stages and FSDP shard over 1 rank; they differ from DDP only in what they hold "
                     "in bf16 (DeepSpeed: the module, beside fp32 masters) and in their buffers, unless they offload)")
    return "\n".join(lines)
