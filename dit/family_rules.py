"""The pretrained families' rules for a run's config, read without torch (``dit.config`` checks them before any work):
the objective, text encoders and VAE each family takes, its image models, and the image-to-video settings of
HunyuanVideo 1.5 (Wan's code form needs the transformer's config: dit/models/condition.py)."""

from __future__ import annotations

from typing import Any

from data_pipelines.config import _check

# model.family: the diffusers transformers (error text)
PRETRAINED_FAMILIES = "wan, cogvideox, ltx, hunyuan, hunyuan15, flux, sd3, zimage or qwenimage"
VAE_FAMILIES = "wan|cogvideox|hunyuan|hunyuan15|ltx|flux|sd3|qwenimage"  # vae.family: diffusers VAEs (error text)
# model.family -> what its text.encoder of the same name holds (text.path, path_2, path_3)
TEXT_OF_FAMILY = {"hunyuan": "text.path: the Llama text_encoder/, text.path_2: the CLIP text_encoder_2/",
                  "hunyuan15": "text.path: the Qwen2.5-VL text_encoder/, text.path_2: the ByT5 text_encoder_2/",
                  "flux": "text.path: the T5 text_encoder_2/, text.path_2: the CLIP text_encoder/",
                  "sd3": "text.path: the T5 text_encoder_3/, text.path_2: CLIP-L text_encoder/, text.path_3: CLIP-G "
                         "text_encoder_2/",
                  "zimage": "text.path: the Qwen3 text_encoder/",
                  "qwenimage": "text.path: the Qwen2.5-VL text_encoder/"}
# model.family: the image models (one frame), their names and the vae.family they take
IMAGE_MODELS = {"flux": ("FLUX.1", "flux"), "sd3": ("Stable Diffusion 3", "sd3"), "zimage": ("Z-Image", "flux"),
                "qwenimage": ("Qwen-Image", "qwenimage")}

FAMILY_TITLES = {"hunyuan": "HunyuanVideo", "hunyuan15": "HunyuanVideo 1.5",
                 **{f: name for f, (name, _) in IMAGE_MODELS.items()}}  # (in errors)
# model.image_encoder: the families whose image-to-video transformer takes an image encoder's states beside the text,
# what that encoder is, and where it is in the download
IMAGE_ENCODERS = {"wan": ("Wan 2.1", "CLIP", ".../Wan2.1-I2V-14B-480P-Diffusers/image_encoder"),
                  "hunyuan15": ("HunyuanVideo 1.5", "SigLIP", "/local/HunyuanVideo-1.5-480p_i2v/image_encoder")}


def check_image_encoder_key(model: Any) -> None:
    """model.image_encoder (a ModelConfig's) is only for the families in IMAGE_ENCODERS."""
    names = " or ".join(name for name, _, _ in IMAGE_ENCODERS.values())
    _check(model.image_encoder is None or model.family in IMAGE_ENCODERS, "model.image_encoder",
           f"is for a {names} image-to-video transformer (model.family={' or '.join(IMAGE_ENCODERS)}); remove it")


def check_family_run(cfg: Any) -> None:
    """A Config's settings fit its model.family: the objective, text encoders, VAE, image model or image-to-video
    rules, embedded guidance and sampler. ConfigError names the key and the fix."""
    family, d = cfg.model.family, cfg.diffusion  # a pretrained family trains with its own objective
    _check(family in ("dit", "cogvideox") or d.objective == "flow", "diffusion.objective",
           f"model.family={family} is a rectified-flow model: set diffusion.objective=flow")
    _check(family != "cogvideox" or (d.objective == "diffusion" and d.prediction == "v"), "diffusion.prediction",
           "model.family=cogvideox predicts v: set diffusion.objective=diffusion diffusion.prediction=v")
    paired = TEXT_OF_FAMILY.get(family)  # HunyuanVideo, FLUX.1, SD3: their own set of text encoders, in one
    _check(paired is None or cfg.text.encoder == family, "text.encoder",
           f"model.family={family} takes text.encoder={family} ({paired})")
    _check(cfg.text.encoder not in TEXT_OF_FAMILY or cfg.text.encoder == family, "text.encoder",
           f"{cfg.text.encoder} is {FAMILY_TITLES.get(cfg.text.encoder, cfg.text.encoder)}'s text "
           f"encoders: set model.family={cfg.text.encoder}, or another text.encoder")
    if family in IMAGE_MODELS:
        _check_image_model(cfg, *IMAGE_MODELS[family])
    if family == "hunyuan15":
        _check_hunyuan15(cfg)
    _check(family in ("hunyuan", "flux") or cfg.sample.guidance is None, "sample.guidance",
           "is the embedded guidance of a guidance-distilled HunyuanVideo or FLUX.1-dev (model.family=hunyuan or "
           "flux); use sample.cfg")
    flow = d.objective == "flow"  # the sampler must fit the objective, found before training
    fits = ("flow_euler", "flow_dpm_solver", "flow_unipc") if flow else ("ddim", "ddpm", "dpm_solver", "cogvideox_dpm")
    _check(cfg.sample.sampler in (None, *fits), "sample.sampler",
           f"{cfg.sample.sampler} does not sample a diffusion.objective={d.objective} model; use "
           f"one of {', '.join(fits)} (or null for {fits[0]})")
    _check(flow or cfg.sample.shift is None, "sample.shift", "is for diffusion.objective=flow; remove it")


def _check_image_model(cfg: Any, name: str, vae: str) -> None:
    """FLUX.1, SD3, Z-Image and Qwen-Image take images, coded by their image VAE: one frame, no sequence parallelism
    (an image's few thousand tokens fit one GPU)."""
    family = cfg.model.family
    _check(cfg.vae.family == vae, "vae.family",
           f"is {cfg.vae.family} but model.family={family} takes {name}'s image VAE: set vae.family={vae} "
           f"vae.pretrained=/local/{name.replace(' ', '-')}/vae")
    _check(cfg.data.frames == 1, "data.frames", f"is {cfg.data.frames} but {name} is an image model: set "
           "data.frames=1 (video shards give their first frame)")
    b = cfg.data.buckets
    _check(not b.enabled or list(b.frames) == [1], "data.buckets.frames",
           f"{list(b.frames)}: {name} is an image model, set data.buckets.frames=[1]")
    _check(cfg.train.sequence_parallel == 1, "train.sequence_parallel",
           f"is for long clips; {name} trains on images (a few thousand tokens): set it to 1")
    _check(cfg.model.condition == "none", "model.condition", f"{name} is a text-to-image model: set none")


def _check_hunyuan15(cfg: Any) -> None:
    """HunyuanVideo 1.5 takes its own VAE; its image-to-video transformer (the image's latent and SigLIP states) is
    given an image in every sample. (model.image_encoder: `dit train` checks it, `dit plan` runs without it:
    dit/models/condition.py ``check_image_condition``.)"""
    _check(cfg.vae.family == "hunyuan15", "vae.family", f"is {cfg.vae.family} but HunyuanVideo 1.5 takes its "
           "own VAE (32 channels, 16x in space): set vae.family=hunyuan15 "
           "vae.pretrained=/local/HunyuanVideo-1.5-480p_t2v/vae")
    if cfg.model.condition != "first_frame":
        return
    # its transformer masks the image tokens only when the whole batch has none, so every sample gets its image
    _check(cfg.model.condition_prob == 1.0, "model.condition_prob", "must be 1 for HunyuanVideo 1.5 "
           "image-to-video: every sample is given its first frame, as its pipeline always is")
