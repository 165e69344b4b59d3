"""Pretrained VAE families (dit/models/vae_families.py): tiny random diffusers VAEs saved into local folders give,
through our VAE contract, exactly what diffusers' own VAE and pipelines give; their compression makes the rules."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_vaes import save_tiny_vae

from dit.config import ConfigError, VAEConfig, load_config
from dit.export import write_export
from dit.models.vae import CausalVAE, encoder_digest, export_vae, load_vae, load_vae_from_config, save_vae
from dit.models.vae_families import PretrainedVAE, load_family_vae
from dit.models.vae_folder import vae_geometry

FAMILIES = ["wan", "cogvideox", "hunyuan", "ltx"]
GEOMETRY = {"wan": (16, 4, 8), "cogvideox": (4, 4, 8), "hunyuan": (4, 4, 8), "ltx": (8, 8, 32)}  # C, time, space
SIZE = {"wan": (9, 32, 32), "cogvideox": (9, 32, 32), "hunyuan": (9, 32, 32), "ltx": (9, 32, 64)}  # T, H, W
close = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (its local diffusers folder, the diffusers VAE that was saved there)."""
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(family: str) -> tuple[Path, torch.nn.Module]:
        if family not in made:
            folder = tmp_path_factory.mktemp(family) / "vae"
            made[family] = folder, save_tiny_vae(family, folder)
        return made[family]

    return get


def video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [B, 3, T, H, W]


def pipeline_compression(family: str, ref: torch.nn.Module) -> tuple[int, int]:
    """(temporal, spatial) as each diffusers pipeline's __init__ reads them from its VAE."""
    if family == "wan":  # WanPipeline
        return ref.config.scale_factor_temporal, ref.config.scale_factor_spatial
    if family == "cogvideox":  # CogVideoXPipeline
        return ref.config.temporal_compression_ratio, 2 ** (len(ref.config.block_out_channels) - 1)
    return ref.temporal_compression_ratio, ref.spatial_compression_ratio  # HunyuanVideoPipeline, LTXPipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_and_compression_are_the_diffusers_vaes(family: str, tiny) -> None:
    folder, ref = tiny(family)
    vae = load_vae_from_config(VAEConfig(family=family, pretrained=str(folder)))
    assert isinstance(vae, PretrainedVAE) and vae.config["family"] == family
    geometry = (vae.latent_channels, vae.temporal_compression, vae.spatial_compression)
    assert geometry == GEOMETRY[family] == tuple(vae_geometry(family, folder))  # loaded == read from config.json
    assert geometry[1:] == pipeline_compression(family, ref)

    x = video(*SIZE[family])
    with torch.no_grad():
        posterior, expected = vae.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, expected.mean, **close)
        torch.testing.assert_close(posterior.logvar, expected.logvar, **close)
        assert posterior.mean.shape == (2, geometry[0], *vae.latent_shape(*SIZE[family]))
        z = posterior.sample(torch.Generator().manual_seed(1))  # [B, C, t, h, w]
        out = vae.decode(z)
        torch.testing.assert_close(out, ref.decode(z).sample, **close)
    assert out.shape == x.shape and out.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_normalize_and_denormalize_are_the_pipelines_formulas(family: str, tiny) -> None:
    folder, ref = tiny(family)
    vae = load_family_vae(family, folder)
    c = vae.latent_channels
    z = torch.randn(2, c, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    if family == "wan":  # WanPipeline (decode) and WanImageToVideoPipeline (encode)
        mean = torch.tensor(ref.config.latents_mean).view(1, c, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, c, 1, 1, 1)
        denorm, norm = z / inv_std + mean, (z - mean) * inv_std
    elif family == "ltx":  # LTXPipeline's own static methods, with the VAE's buffers and scaling_factor 0.8
        from diffusers import LTXPipeline

        args = (ref.latents_mean, ref.latents_std, ref.config.scaling_factor)
        denorm, norm = LTXPipeline._denormalize_latents(z, *args), LTXPipeline._normalize_latents(z, *args)
    elif family == "cogvideox":  # CogVideoXPipeline.decode_latents, CogVideoXImageToVideoPipeline
        denorm, norm = 1 / ref.config.scaling_factor * z, ref.config.scaling_factor * z
    else:  # HunyuanVideoPipeline, HunyuanVideoImageToVideoPipeline
        denorm, norm = z / ref.config.scaling_factor, z * ref.config.scaling_factor
    torch.testing.assert_close(vae.denormalize(z), denorm, **close)
    torch.testing.assert_close(vae.normalize(z), norm, **close)
    torch.testing.assert_close(vae.normalize(vae.denormalize(z)), z, **close)
    assert not torch.allclose(norm, z)  # the tiny VAEs' statistics are not the identity


def test_ltx_frame_and_size_rules_come_from_its_vae(tiny) -> None:
    folder, _ = tiny("ltx")
    ltx = ["vae.family=ltx", f"vae.pretrained={folder}"]
    ok = load_config(None, [*ltx, "data.frames=17", "data.height=64", "data.width=128"])
    spatial = 32 * ok.patch_size()[1]  # the VAE's 32 x the denoiser's spatial patch
    with pytest.raises(ConfigError, match=r"data.frames: frames=13 must be 8k\+1 \(nearest valid: \[9, 17\]\)"):
        load_config(None, [*ltx, "data.frames=13", "data.height=64", "data.width=128"])
    near = [spatial, 2 * spatial] if spatial > 48 else [48]
    with pytest.raises(ConfigError, match=rf"data.height: height=48 must be a multiple of {spatial} "
                                          rf"\(nearest valid: \[{', '.join(map(str, near))}\]\)"):
        load_config(None, [*ltx, "data.frames=17", "data.height=48", "data.width=128"])
    with pytest.raises(ConfigError, match=r"data.buckets.frames: \[13\]: frames=13 must be 8k\+1 "
                                          r"\(nearest valid: \[9, 17\]\)"):
        load_config(None, [*ltx, "data.frames=17", "data.height=64", "data.width=128", "data.buckets.enabled=true",
                           "data.buckets.frames=[1, 13]", f"data.buckets.multiple={spatial}",
                           f"data.buckets.resolution={spatial}"])
    load_config(None, ["data.frames=13", "data.height=48", "data.width=48"])  # our 4k+1 / 8x VAE takes them
    vae = load_family_vae("ltx", folder)
    with pytest.raises(ValueError, match=r"frames=13 must be 8k\+1 \(nearest valid: \[9, 17\]\)"):
        vae.encode(video(13, 32, 32))


def test_bad_folders_and_settings_fail_before_any_work_naming_the_path_and_fix(tiny, tmp_path: Path) -> None:
    wan, _ = tiny("wan")
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"vae.pretrained: '.*{missing.name}' does not exist; point it "
                                          "at a local diffusers vae folder"):
        VAEConfig(family="wan", pretrained=str(missing))
    pipeline = tmp_path / "Wan-Diffusers"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"no config.json\); this looks like a diffusers pipeline: use "
                                          r"vae.pretrained=.*Wan-Diffusers/vae"):
        VAEConfig(family="wan", pretrained=str(pipeline))
    with pytest.raises(ConfigError, match="holds a AutoencoderKLWan, but vae.family=cogvideox needs a "
                                          "AutoencoderKLCogVideoX; set vae.family=wan"):
        VAEConfig(family="cogvideox", pretrained=str(wan))
    text_model = tmp_path / "t5"
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match=r"model config of no _class_name \(not a diffusers model"):
        VAEConfig(family="ltx", pretrained=str(text_model))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(wan / "config.json", no_weights)
    with pytest.raises(ConfigError, match=r"no_weights' has no \*.safetensors weights"):
        VAEConfig(family="wan", pretrained=str(no_weights))
    assert VAEConfig(family="wan").geometry() == (16, 4, 8)  # no folder: the released model's sizes (dit plan)
    with pytest.raises(ConfigError, match="vae.family=wan needs vae.pretrained="):  # but weights need one
        load_vae_from_config(VAEConfig(family="wan"))
    with pytest.raises(ConfigError, match="vae.checkpoint: .* drop vae.checkpoint"):
        VAEConfig(family="wan", pretrained=str(wan), checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="vae.pretrained: is for vae.family="):
        VAEConfig(pretrained=str(wan))
    with pytest.raises(ConfigError, match="unknown family 'sd'"):
        VAEConfig(family="sd", pretrained=str(wan))
    with pytest.raises(FileNotFoundError, match="does not exist"):  # the loader checks too (no config needed)
        load_family_vae("wan", missing)


def test_a_checkpoint_records_its_vae_and_load_vae_reads_either_form(tiny, tmp_path: Path) -> None:
    folder, ref = tiny("wan")
    export_vae(VAEConfig(family="wan", pretrained=str(folder)), tmp_path / "ckpt" / "vae")
    assert [p.name for p in (tmp_path / "ckpt" / "vae").iterdir()] == ["vae.json"]  # no multi-GB copy
    record = json.loads((tmp_path / "ckpt" / "vae" / "vae.json").read_text())
    assert record == {"family": "wan", "pretrained": str(folder.resolve()), "tiling": False, "dtype": "fp32"}
    vae = load_vae(tmp_path / "ckpt" / "vae")
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), ref.decode(z).sample, **close)
    (tmp_path / "export").mkdir()  # what training's checkpoint export writes, and what load_pipeline reads
    write_export(tmp_path / "export", weights={}, config={}, vae=VAEConfig(family="wan", pretrained=str(folder)))
    assert json.loads((tmp_path / "export" / "vae" / "vae.json").read_text()) == record
    assert isinstance(load_vae(tmp_path / "export" / "vae"), PretrainedVAE)

    torch.manual_seed(0)
    save_vae(CausalVAE(latent_channels=4, base_channels=8), tmp_path / "ours")
    export_vae(VAEConfig(checkpoint=str(tmp_path / "ours")), tmp_path / "ckpt2" / "vae")
    ours = load_vae(tmp_path / "ckpt2" / "vae")
    assert isinstance(ours, CausalVAE)
    for k, v in load_vae(tmp_path / "ours").state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_vae_dtype_holds_the_weights_in_it_and_gives_fp32(family: str, tiny, tmp_path: Path) -> None:
    folder, ref = tiny(family)
    vae = load_vae_from_config(VAEConfig(family=family, pretrained=str(folder), dtype="bf16"))
    assert {p.dtype for p in vae.vae.parameters()} == {torch.bfloat16}
    half = copy.deepcopy(ref).to(torch.bfloat16)  # diffusers' VAE as a pipeline loaded with torch_dtype=bf16 holds it
    x = video(*SIZE[family])
    with torch.no_grad():
        posterior, expected = vae.encode(x), half.encode(x.to(torch.bfloat16)).latent_dist
        assert posterior.mean.dtype == posterior.logvar.dtype == torch.float32
        torch.testing.assert_close(posterior.mean, expected.mean.float(), rtol=0, atol=0)
        z = posterior.mode()
        out = vae.decode(z)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, half.decode(z.to(torch.bfloat16)).sample.float(), rtol=0, atol=0)
        full = ref.encode(x).latent_dist.mean
    assert not torch.equal(posterior.mean, full)  # bf16 took effect, and stays near the fp32 VAE
    torch.testing.assert_close(posterior.mean, full, rtol=0.05, atol=0.05)
    # latent shards record the fp32 weights' digest: those encoded in one dtype serve a run in the other
    assert encoder_digest(vae) == encoder_digest(load_family_vae(family, folder))
    export_vae(VAEConfig(family=family, pretrained=str(folder), dtype="bf16"), tmp_path / "vae")
    again = load_vae(tmp_path / "vae")
    assert again.config["dtype"] == "bf16" and next(again.vae.parameters()).dtype == torch.bfloat16
    record = json.loads((tmp_path / "vae" / "vae.json").read_text())
    del record["dtype"]  # a checkpoint written before vae.dtype existed loads as it was: fp32
    (tmp_path / "vae" / "vae.json").write_text(json.dumps(record))
    assert next(load_vae(tmp_path / "vae").vae.parameters()).dtype == torch.float32


def test_tiling_switch_gives_diffusers_tiled_decode(tiny) -> None:
    folder, ref = tiny("wan")
    tiled = load_vae_from_config(VAEConfig(family="wan", pretrained=str(folder), tiling=True))
    plain = load_family_vae("wan", folder)
    assert tiled.vae.use_tiling and not plain.vae.use_tiling
    z = torch.randn(1, 16, 1, 40, 40, generator=torch.Generator().manual_seed(4))  # 320 px > 256 px tiles
    with torch.no_grad():
        out = tiled.decode(z)
        ref.enable_tiling()
        try:
            torch.testing.assert_close(out, ref.decode(z).sample, **close)
        finally:
            ref.disable_tiling()
        assert not torch.allclose(out, plain.decode(z), atol=1e-4)  # tiles are blended: not the plain decode


def test_cogvideox_chunk_size_is_its_latent_frame_batch(tiny) -> None:
    folder, ref = tiny("cogvideox")
    vae = load_family_vae("cogvideox", folder)
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref.num_latent_frames_batch_size = 1
        one = ref.decode(z).sample
        ref.num_latent_frames_batch_size = 2
        torch.testing.assert_close(vae.decode(z, chunk_size=1), one, **close)
        torch.testing.assert_close(vae.decode(z), ref.decode(z).sample, **close)  # 0: diffusers' default, 2
    assert vae.vae.num_latent_frames_batch_size == 2


def test_encoder_digest_covers_the_encoder_side_only(tiny, tmp_path: Path) -> None:
    folder, _ = tiny("wan")
    a, b = load_family_vae("wan", folder), load_family_vae("wan", folder)
    assert encoder_digest(a) == encoder_digest(b)
    with torch.no_grad():
        b.vae.decoder.conv_in.weight.add_(1.0)  # decoder weights: posteriors unchanged
        assert encoder_digest(a) == encoder_digest(b)
        b.vae.quant_conv.weight.add_(1.0)  # after the encoder, before the posterior
    assert encoder_digest(a) != encoder_digest(b)
    save_tiny_vae("wan", tmp_path / "other", seed=1)
    assert encoder_digest(load_family_vae("wan", tmp_path / "other")) != encoder_digest(a)


def test_a_timestep_conditioned_ltx_decoder_gets_ltx_pipelines_default_decode_timestep(tmp_path: Path) -> None:
    ref = save_tiny_vae("ltx", tmp_path / "vae", timestep_conditioning=True)
    vae = load_family_vae("ltx", tmp_path / "vae")
    z = torch.randn(2, 8, 2, 1, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # LTXPipeline: decode_timestep=0.0, decode_noise_scale=None -> 0: no added noise
        torch.testing.assert_close(vae.decode(z), ref.decode(z, torch.zeros(2)).sample, **close)
        assert not torch.allclose(ref.decode(z, torch.full((2,), 0.5)).sample, vae.decode(z), atol=1e-4)
