"""What one training step is given: this rank's random streams (``RandomStreams``), a batch drawn into latents,
text states, timesteps, noise and an image-to-video condition (``draw_batch``: the same draws from raw and from
latent shards), and the loss of each of its micro-batches (``micro_loss``). The loop that calls them is train.py."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from dit.config import Config, DiffusionConfig, ModelConfig
from dit.diffusion.flow import latent_tokens, sample_sigmas
from dit.diffusion.objectives import flow_loss, training_loss
from dit.distributed.strategies import Strategy
from dit.models.condition import (
    clip_states_of,
    condition_mask,
    condition_replaces,
    draw_code_condition,
    draw_first_frame_condition,
    image_code,
)
from dit.models.families import frame_pad
from dit.models.vae import DiagonalGaussian
from dit.training.checkpoint import rng_state, set_rng_state


class RandomStreams:
    """This rank's training randomness: a torch generator (posterior and diffusion noise, timesteps; drawn on the
    CPU, so the same on every device) and a Python RNG (prompt dropout), saved and restored with checkpoints."""

    def __init__(self, seed: int) -> None:
        self.gen, self.py = torch.Generator(device="cpu").manual_seed(seed), random.Random(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(), "generator": self.gen.get_state(), "py_rng": self.py.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])
        version, internal, gauss = state["py_rng"]
        self.py.setstate((version, tuple(internal), gauss))
        set_rng_state(state["rng"])



@torch.no_grad()
def stored_text(batch: dict[str, Any], captions: list[str], text: torch.nn.Module,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states from latent shards (stored without their padding) -> [B, L, D] + mask [B, L], padded to the
    encoder's length; a dropped prompt ("") takes the encoder's unconditional states, as ``text.encode`` gives."""
    uncond, uncond_mask = (x.to(device) for x in text.encode([""]))  # [1, L, D], [1, L] (text.device may be cpu)
    stored, stored_mask = batch["text"].to(device), batch["text_mask"].to(device)  # [B, n, D], [B, n]
    (b, n, _), length = stored.shape, uncond.shape[1]
    if n > length:
        raise ValueError(f"latent shards hold text states of {n} tokens, more than the text encoder's {length} "
                         "(text.max_length): set text.* as when the shards were encoded")
    states = torch.zeros(b, length, uncond.shape[2], device=device, dtype=uncond.dtype)  # [B, L, D]
    mask = torch.zeros(b, length, dtype=torch.bool, device=device)  # [B, L]
    states[:, :n], mask[:, :n] = stored, stored_mask
    dropped = torch.tensor([c == "" for c in captions], device=device)  # [B]
    states[dropped], mask[dropped] = uncond[0], uncond_mask[0]
    return states, mask


@torch.no_grad()
def draw_batch(batch: dict[str, Any], vae: torch.nn.Module, text: torch.nn.Module, diffusion: DiffusionConfig,
               patch: tuple[int, int, int], rng: RandomStreams, device: torch.device,
               keep: slice | None, model: ModelConfig | None = None, code: str = "",
               image_encoder: torch.nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Latents, text states + mask, timesteps (integer steps; for flow σ in [0, 1]) and noise for a batch; ``keep``
    slices a global batch to this rank. A batch from latent shards (``mean``/``logvar``, maybe ``text``) skips the
    VAE encoder (and the text encoder) but draws the same random numbers in the same order, so it trains exactly as
    the raw shards it came from. With model.condition=first_frame a sixth tensor follows: the image-to-video
    condition (dit/models/condition.py), drawn after everything else, from the clip's own latent frame 0 (the VAE
    codes pixel frame 0 alone there, so it is a latent of the first frame by itself; the same draw the target
    holds, so frame 0 of the target is the condition up to its noise augmentation. Sampling gives the image's
    posterior mean: a trained VAE's posterior std is far below model.condition_noise). A Wan I2V model of the code
    form (``code``: "first", or "first_last" for FLF2V, as ``image_frames``) gets its own condition, the code of
    [first frame, grey...] (or [first, grey..., last]; stored in latent shards, or coded here), and Wan 2.1 I2V's
    (``image_encoder``: its CLIP encoder, or latent shards holding what it gives) a seventh tensor, the given
    frames' CLIP states (zeros in the rows whose condition was dropped)."""
    if "mean" in batch:  # the stored posterior
        posterior = DiagonalGaussian(batch["mean"].to(device), batch["logvar"].to(device))
    else:
        posterior = vae.encode(batch["video"].to(device))
    latents = vae.normalize(posterior.sample(rng.gen))  # [B, C, t, h, w]
    pad = frame_pad(model.family, latents.shape[2], patch[0]) if model is not None else 0
    if pad:  # CogVideoX 1.5 at an odd latent count: latent frame 0 repeated in front, as its fine-tuning does
        latents = torch.cat([latents[:, :, :1].expand(-1, -1, pad, -1, -1), latents], dim=2)
    captions = ["" if rng.py.random() < diffusion.prompt_dropout else c for c in batch["caption"]]  # CFG's uncond
    if "text" in batch:
        states, mask = stored_text(batch, captions, text, device)
    else:
        states, mask = (x.to(device) for x in text.encode(captions))  # [B, L, D], [B, L]
    if diffusion.objective == "flow":
        tokens = latent_tokens(latents.shape[2:], patch) if diffusion.dynamic_shift else None
        t = sample_sigmas(latents.shape[0], rng.gen, diffusion, tokens).to(device)  # σ [B]
    else:
        t = torch.randint(0, diffusion.num_timesteps, (latents.shape[0],), generator=rng.gen).to(device)  # [B]
    noise = torch.randn(latents.shape, generator=rng.gen).to(device)  # [B, C, t, h, w]
    drawn = (latents, states, mask, t, noise)
    if code:  # the code form (dit/models/condition.py): stored, or coded from the first (and last) frames
        flf = code == "first_last"  # Wan 2.1 FLF2V: the clip's last frame too
        first = None if "image_code" in batch else batch["video"][:, :, 0].to(device)  # [B, 3, H, W]
        last = batch["video"][:, :, -1].to(device) if first is not None and flf else None
        codes = (batch["image_code"].to(device) if first is None else
                 image_code(vae, first, batch["video"].shape[2], last))
        condition, kept = draw_code_condition(codes, vae.temporal_compression, model.condition_prob,
                                              model.condition_noise, rng.gen, last=flf)  # [B, 4 + C, t, h, w]
        drawn += (condition,)
        if "image_states" in batch or image_encoder is not None:  # Wan 2.1 I2V's CLIP states [B, n (x 2), D]
            states_img = (batch["image_states"].to(device) if first is None else
                          clip_states_of(image_encoder, first, last).to(device))
            drawn += (states_img * kept.to(states_img.dtype).view(-1, 1, 1),)
    elif model is not None and model.condition == "first_frame":
        first = latents[:, :, :1] * vae.condition_scale  # (CogVideoX 1.5's VAE: see vae_families)
        drawn += (draw_first_frame_condition(first, latents.shape[2], model.condition_prob, model.condition_noise,
                                             rng.gen, condition_mask(model)),)  # [B, C (+ 1), t, h, w]
        if "image_states" in batch:  # HunyuanVideo 1.5: the first frame's SigLIP states, stored by `dit encode`
            drawn += (batch["image_states"].to(device),)
        elif image_encoder is not None:  # (or from the raw shard's first frame)
            drawn += (clip_states_of(image_encoder, batch["video"][:, :, 0].to(device)).to(device),)
    return drawn if keep is None else tuple(x[keep] for x in drawn)


def micro_loss(strategy: Strategy, drawn: tuple[torch.Tensor, ...], noise_schedule: Any,
               cfg: Config, model: torch.nn.Module | None = None) -> Callable[[int], torch.Tensor]:
    """The loss of micro-batch ``i`` (train.batch_size rows) of a drawn batch, for ``train_step``; of ``model``
    (the validation's EMA) in place of the strategy's wrapped one when given."""
    model = strategy.model if model is None else model
    latents, states, mask, t, noise = drawn[:5]
    condition = drawn[5] if len(drawn) > 5 else None  # image-to-video (model.condition=first_frame)
    image_states = drawn[6] if len(drawn) > 6 else None  # Wan 2.1 I2V's CLIP states
    b = cfg.train.batch_size
    replaces = condition is not None and condition_replaces(cfg.model)  # (read once a step, not per micro-batch)

    def loss(i: int) -> torch.Tensor:
        r = slice(i * b, (i + 1) * b) if cfg.train.grad_accum_steps > 1 else slice(None)  # (buckets vary B)
        kwargs = dict(text=states[r], text_mask=mask[r])
        weight = None
        if condition is not None:
            # The loss covers every latent frame, the conditioned frame 0 too: the model itself must draw the
            # given first frame (sampling decodes its output, nothing is pasted in), the rows whose condition was
            # dropped need frame 0 in the loss anyway, and the default (condition none) loss stays as it was.
            # Except where the model takes the image in place of frame 0 (Wan): there it is left out.
            kwargs["condition"] = condition[r]
            if image_states is not None:
                kwargs["image_states"] = image_states[r]
            if replaces:
                weight = 1 - condition[r][:, -1:]  # [B, 1, t, h, w]: 0 where the image stands
        if cfg.diffusion.objective == "flow":
            return flow_loss(model, latents[r], sigma=t[r], noise=noise[r], model_kwargs=kwargs,
                             weight=weight)
        return training_loss(model, latents[r], noise_schedule, model_kwargs=kwargs,
                             prediction=cfg.diffusion.prediction, t=t[r], noise=noise[r],
                             min_snr_gamma=cfg.diffusion.min_snr_gamma)

    return loss
