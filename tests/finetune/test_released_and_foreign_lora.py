"""`dit sample --config` samples a released model straight from its diffusers folders (no training run), and `--lora`
takes another tool's LoRA file (ComfyUI's original Wan names, musubi-tuner's ``lora_unet_`` names, HunyuanVideo's
original names), converted by diffusers' own loader of the family; `train.lora.init_from` starts a LoRA run from
one. References: diffusers' WanPipeline on the same folder, peft's adapter as diffusers loads the same file, and the
merge written out by hand from the file's tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "families"))
from runs import MEDIA_FREE  # noqa: E402  (tests/training, on the path by tests/finetune/conftest.py)
from tiny_families import tiny_transformer  # noqa: E402
from tiny_vaes import save_tiny_vae  # noqa: E402

from dit.cli import main as dit  # noqa: E402
from dit.config import ConfigError, load_config  # noqa: E402
from dit.pipeline import load_pipeline, sample_latents  # noqa: E402
from dit.released import release_weights  # noqa: E402
from dit.weights import with_lora  # noqa: E402

TEXT = 8  # text.encoder=none's width
RANK = {"self_attn": 4, "cross_attn": 4, "ffn": 2}
ALPHA = {"self_attn": 8.0, "cross_attn": 2.0, "ffn": 1.0}  # alpha / rank: 2, 0.5, 0.5
# Wan's original (ComfyUI, musubi) module -> diffusers' WanTransformer3DModel module, and (out, in) of the tiny model
ATTN = dict(zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0")))
MODULES = {**{f"self_attn.{o}": (f"attn1.{d}", (24, 24)) for o, d in ATTN.items()},
           **{f"cross_attn.{o}": (f"attn2.{d}", (24, 24)) for o, d in ATTN.items()},
           "ffn.0": ("ffn.net.0.proj", (32, 24)), "ffn.2": ("ffn.net.2", (24, 32))}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A tiny "release": transformer/ and vae/ diffusers folders, and an experiment YAML naming neither."""
    root = tmp_path_factory.mktemp("release")
    tiny_transformer("wan", in_channels=16, out_channels=16, text_dim=TEXT).save_pretrained(root / "transformer")
    save_tiny_vae("wan", root / "vae")
    (root / "wan.yaml").write_text(yaml.safe_dump({
        "model": {"family": "wan"}, "vae": {"family": "wan"}, "text": {"encoder": "none"},
        "diffusion": {"objective": "flow", "shift": 3.0}, "sample": {"sampler": "flow_euler", "steps": 2, "cfg": 4.0},
        "data": {"frames": 9, "height": 32, "width": 48}}))
    return root


def folders(root: Path) -> list[str]:
    return [f"model.pretrained={root / 'transformer'}", f"vae.pretrained={root / 'vae'}"]


def original_tensors(seed: int = 0, rank: dict[str, int] = RANK, bias: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA on every block module of the tiny Wan, keyed by Wan's original names: ``blocks.N.<module>.<kind>``
    (down [r, in], up [out, r], alpha) and a ``diff_b`` (a bias delta, as CausVid's LoRAs carry)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in (0, 1):
        for module, (_, (o, i)) in MODULES.items():
            part = module.split(".")[0]
            stem = f"blocks.{n}.{module}"
            out[f"{stem}.lora_down.weight"] = torch.randn(rank[part], i, generator=g) * 0.3
            out[f"{stem}.lora_up.weight"] = torch.randn(o, rank[part], generator=g) * 0.3
            out[f"{stem}.alpha"] = torch.tensor(ALPHA[part])
            if bias:
                out[f"{stem}.diff_b"] = torch.randn(o, generator=g) * 0.3
    return out


def comfyui_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({f"diffusion_model.{k}": v for k, v in tensors.items()}, str(path))
    return path


def musubi_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """musubi-tuner's layout: lora_unet_ and the module path with underscores (no diff_b: musubi writes none)."""
    def name(k: str) -> str:
        stem, kind = k.split(".lora_") if ".lora_" in k else k.rsplit(".", 1)
        kind = f"lora_{kind}" if ".lora_" in k else kind
        return f"lora_unet_{stem.replace('.', '_')}.{kind}"

    save_file({name(k): v for k, v in tensors.items() if not k.endswith("diff_b")}, str(path))
    return path


def by_hand(base: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], scale: float,
            bias: bool = True) -> dict[str, torch.Tensor]:
    """base + scale * alpha / rank * up @ down on each module (and the bias delta), from the file's tensors."""
    want = dict(base)
    for n in (0, 1):
        for module, (diffusers_name, _) in MODULES.items():
            stem, key = f"blocks.{n}.{module}", f"transformer.blocks.{n}.{diffusers_name}"
            down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
            factor = scale * float(tensors[f"{stem}.alpha"]) / down.shape[0]
            want[f"{key}.weight"] = (base[f"{key}.weight"].double() + factor * up.double() @ down.double()).float()
            if bias:
                want[f"{key}.bias"] = base[f"{key}.bias"] + scale * tensors[f"{stem}.diff_b"]
    return want


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 5, TEXT, generator=g)


@torch.no_grad()
def test_a_released_model_samples_from_its_folders_as_wan_pipeline_does(release: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    cfg = load_config(release / "wan.yaml", folders(release))
    from dit.models.text import NoText

    pipe = load_pipeline(cfg, text=NoText(TEXT))
    assert pipe.config["dit"]["family"] == "wan" and pipe.config["experiment"]["model"]["pretrained"]
    x, text = inputs()
    neg = torch.zeros_like(text)
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = sample_latents(pipe, x, dict(text=text, text_mask=mask), dict(text=neg, text_mask=mask), steps=3, cfg=4.0)
    ref_pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           transformer=WanTransformer3DModel.from_pretrained(release / "transformer"))
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(prompt_embeds=text, negative_prompt_embeds=neg, latents=x.clone(), num_inference_steps=3,
                   guidance_scale=4.0, height=32, width=48, num_frames=9, output_type="latent").frames
    assert (got - x).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_comfyui_and_musubi_lora_files_merge_as_written_and_as_diffusers_applies_them(release: Path,
                                                                                     tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from dit.released import release_config

    cfg = load_config(release / "wan.yaml", folders(release))
    base, config = release_weights(cfg), release_config(cfg)
    tensors = original_tensors()
    comfy = comfyui_file(tmp_path / "comfy.safetensors", tensors)
    merged = with_lora(base, config, comfy, 0.7)
    want = by_hand(base, tensors, 0.7)
    assert merged.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) == 2 * 2 * len(MODULES)  # every module of both blocks, weight and bias
    for k in want:
        torch.testing.assert_close(merged[k], want[k], atol=1e-6, rtol=0)
    musubi = with_lora(base, config, musubi_file(tmp_path / "musubi.safetensors", tensors), 0.7)
    for k, v in by_hand(base, tensors, 0.7, bias=False).items():
        torch.testing.assert_close(musubi[k], v, atol=1e-6, rtol=0)

    # diffusers applying the same file with peft at scale 0.7 (set_adapters), against our merged model
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=WanTransformer3DModel.from_pretrained(release / "transformer"))
    pipe.load_lora_weights(str(comfy), adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    from dit.models.text import NoText

    ours = load_pipeline(cfg, text=NoText(TEXT), lora=comfy, lora_scale=0.7)
    x, text = inputs(1)
    t = torch.tensor([700.0, 120.0])
    plain = WanTransformer3DModel.from_pretrained(release / "transformer").eval()(x, t, text, return_dict=False)[0]
    theirs = pipe.transformer.eval()(x, t, text, return_dict=False)[0]
    mine = ours.model(x, t, text, torch.ones(2, 5, dtype=torch.bool))
    assert (theirs - plain).abs().max() > 1e-2
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_foreign_lora_files_that_cannot_apply_are_refused_by_name(release: Path, tmp_path: Path) -> None:
    from dit.released import release_config

    cfg = load_config(release / "wan.yaml", folders(release))
    base, config = release_weights(cfg), release_config(cfg)
    tensors = original_tensors()
    dora = {**tensors, "blocks.0.self_attn.q.dora_scale": torch.ones(24, 1)}
    with pytest.raises(ConfigError, match=r"a DoRA adapter \(diffusion_model.blocks.0.self_attn.q.dora_scale\)"):
        with_lora(base, config, comfyui_file(tmp_path / "dora.safetensors", dora), 1.0)
    wide = {k: torch.randn(v.shape[0], 40) if k.endswith("lora_down.weight") else v for k, v in tensors.items()}
    with pytest.raises(ConfigError, match=r"--lora .*wide.safetensors: the adapter's .* but the base weight is "
                                          r"24x24: an adapter for another model"):
        with_lora(base, config, comfyui_file(tmp_path / "wide.safetensors", wide), 1.0)
    half = {k: v for k, v in tensors.items() if not k.startswith("blocks.1.cross_attn")}  # musubi's needs them all
    with pytest.raises(ConfigError, match=r"diffusers' wan LoRA converter \(WanLoraLoaderMixin\) cannot read it "
                                          r"\(KeyError"):
        with_lora(base, config, musubi_file(tmp_path / "half.safetensors", half), 1.0)
    pickle = tmp_path / "old.ckpt"
    torch.save({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 24)}, pickle)
    with pytest.raises(ConfigError, match=r"old.ckpt: not a readable .safetensors file"):
        with_lora(base, config, pickle, 1.0)
    other = tmp_path / "other.safetensors"
    save_file({"unet.down.0.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ConfigError, match=r"tensors are not LoRA weights dit can merge \(unet.down.0.weight"):
        with_lora(base, config, other, 1.0)


def test_dit_sample_config_runs_a_release_with_a_comfyui_lora_and_refuses_what_it_cannot(release: Path,
                                                                                       tmp_path: Path,
                                                                                       capsys) -> None:
    from PIL import Image, ImageSequence

    comfy = comfyui_file(tmp_path / "comfy.safetensors", original_tensors())
    outs = {}
    for name, extra in (("plain", []), ("lora", ["--lora", str(comfy), "--lora-scale", "1.5"]),
                        ("scale0", ["--lora", str(comfy), "--lora-scale", "0"])):
        outs[name] = tmp_path / f"{name}.gif"
        dit(["sample", "--config", str(release / "wan.yaml"), *folders(release), "--prompt", "a red circle",
             "--steps", "2", "--seed", "3", "--out", str(outs[name]), *extra])
        err = capsys.readouterr().err
        assert f"loaded released model {release / 'transformer'} (wan)" in err
        assert "sampling 1 clip(s) of 9x32x48" in err  # the config's data size
    frames = {}
    for name, path in outs.items():
        with Image.open(path) as im:
            assert im.n_frames == 9 and im.size == (48, 32)
            frames[name] = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    assert (frames["plain"] != frames["lora"]).any()  # the adapter changed the clip (the tiny VAE mutes how much)
    assert np.array_equal(frames["plain"], frames["scale0"])  # and at scale 0 it is the release itself

    for argv, message in (
            (["--config", str(release / "wan.yaml"), f"vae.pretrained={release / 'vae'}"],
             "model.pretrained is not set: give the wan transformer folder"),
            (["--config", str(tmp_path / "missing.yaml")], "missing.yaml' does not exist"),
            (["--checkpoint", str(tmp_path), f"model.pretrained={release / 'transformer'}"],
             "key=value overrides go with --config")):
        with pytest.raises(SystemExit) as e:
            dit(["sample", *argv, "--prompt", "x", "--out", str(tmp_path / "x.gif")])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: one of the two
        dit(["sample", "--prompt", "x"])
    assert e.value.code == 2 and "one of the arguments --checkpoint --config is required" in capsys.readouterr().err


@pytest.mark.skipif(MEDIA_FREE, reason="trains on the small raw shards (PyAV)")
def test_a_lora_run_starts_from_a_comfyui_adapter_and_resumes_on_its_modules(release: Path, tmp_path: Path,
                                                                            small_shards: str) -> None:
    """train.lora.init_from: the adapter of another tool's file is the run's start (its modules the targets, A
    rescaled from the file's alpha / rank to the run's), so a run that has hardly moved (lr 1e-12) samples as the
    release with the file does; it resumes on the same modules without the file; a file it cannot train from is
    refused before any work."""
    from dit.export import list_checkpoints
    from dit.models.lora import LORA_FILE
    from dit.models.text import NoText
    from dit.training import train

    tensors = original_tensors(rank={"self_attn": 4, "cross_attn": 4, "ffn": 4}, bias=False)
    comfy = comfyui_file(tmp_path / "comfy.safetensors", tensors)  # alpha / rank: 2, 0.5, 0.25; the run's 0.5

    def config(run: Path, **extra: object):
        items = {"data.shards": small_shards, "train.output_dir": run, "data.frames": 5, "data.height": 16,
                 "data.width": 16, "train.batch_size": 2, "train.steps": 1, "train.checkpoint_every": 1,
                 "train.lr": 1e-12, "train.warmup_steps": 0, "train.ema_decay": 0.0, "train.lora.rank": 4,
                 "train.lora.alpha": 2, "train.lora.init_from": comfy, **extra}
        return load_config(release / "wan.yaml", folders(release) + [f"{k}={v}" for k, v in items.items()])

    run = tmp_path / "run"
    train.main(config(run))
    ckpt = list_checkpoints(run)[-1]
    from safetensors.torch import load_file

    saved = load_file(ckpt / LORA_FILE)
    assert {k.rsplit(".lora_", 1)[0] for k in saved} == {f"transformer.blocks.{n}.{d}" for n in (0, 1)
                                                         for d, _ in MODULES.values()}
    # the record's update size, |scale B A| / |W| per module, against B @ A written out (scale 2 / 4, the run's)
    import json

    update = json.loads((ckpt / "config.json").read_text())["lora"]["update"]
    base = release_weights(load_config(release / "wan.yaml", folders(release)))
    rel = {}
    for m in {k.rsplit(".lora_", 1)[0] for k in saved}:
        delta = 0.5 * saved[f"{m}.lora_B.weight"].double() @ saved[f"{m}.lora_A.weight"].double()
        rel[m] = float(delta.norm() / base[f"{m}.weight"].double().norm())
    assert update["max_module"] == max(rel, key=rel.__getitem__)
    assert update["max"] == pytest.approx(max(rel.values()), rel=1e-6)
    assert update["median"] == pytest.approx(sorted(rel.values())[(len(rel) - 1) // 2], rel=1e-6)
    assert 1e-3 < update["median"] < update["max"]  # the started adapter's update: not nothing
    x, text = inputs(2)
    t, mask = torch.tensor([600.0, 90.0]), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        got = load_pipeline(run, text=NoText(TEXT)).model(x, t, text, mask)
        want = load_pipeline(load_config(release / "wan.yaml", folders(release)), text=NoText(TEXT),
                             lora=comfy).model(x, t, text, mask)
        plain = load_pipeline(load_config(release / "wan.yaml", folders(release)), text=NoText(TEXT)).model(
            x, t, text, mask)
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    comfy.rename(tmp_path / "moved.safetensors")  # a resumed run reads its modules from its checkpoint
    train.main(config(run, **{"train.steps": 2}))
    assert [c.name for c in list_checkpoints(run)][-1] == "step-00000002"
    assert load_file(list_checkpoints(run)[-1] / LORA_FILE).keys() == saved.keys()

    comfy = comfyui_file(tmp_path / "comfy.safetensors", tensors)
    # `dit lora merge RUN --lora FILE`: a plain checkpoint of the run with the file's adapter merged in, at --scale
    merged = tmp_path / "merged"
    dit(["lora", "merge", str(run), "--lora", str(comfy), "--scale", "0.5", "--out", str(merged)])
    assert "lora" not in json.loads((merged / "config.json").read_text())
    with torch.no_grad():
        got = load_pipeline(merged, text=NoText(TEXT)).model(x, t, text, mask)
        want = load_pipeline(run, text=NoText(TEXT), lora=comfy, lora_scale=0.5).model(x, t, text, mask)
        plain_run = load_pipeline(run, text=NoText(TEXT)).model(x, t, text, mask)
    assert (want - plain_run).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(SystemExit) as e:
        dit(["lora", "merge", str(run), "--lora", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "m2")])
    assert e.value.code == 2 and not (tmp_path / "m2").exists()
    biased = comfyui_file(tmp_path / "biased.safetensors", original_tensors(rank={"self_attn": 4, "cross_attn": 4,
                                                                                   "ffn": 4}))
    mixed = comfyui_file(tmp_path / "mixed.safetensors", original_tensors(bias=False))
    refused = [({"train.lora.rank": 8}, r"its rank is 4, train.lora.rank is 8: set train.lora.rank=4"),
               ({"train.lora.init_from": biased}, r"it holds bias deltas \(transformer.blocks.0"),
               ({"train.lora.init_from": mixed}, r"its rank is 2/4, train.lora.rank is 4: a run trains one rank"),
               ({"train.lora.init_from": tmp_path / "gone"}, r"'.*gone' does not exist"),
               ({"train.lora.targets": r"[transformer\.blocks\.0\.attn1\.to_q]"},
                r"it adapts 'transformer.blocks.[01].[a-z0-9_.]+', which train.lora.targets does not select")]
    for n, (extra, message) in enumerate(refused):
        fresh = tmp_path / f"fresh{n}"
        with pytest.raises(ConfigError, match=message):
            train.main(config(fresh, **extra))
        assert not list_checkpoints(fresh) if fresh.exists() else True
    with pytest.raises(ConfigError, match="train.lora.init_from: continues training an adapter: set train.lora.rank"):
        config(tmp_path / "norank", **{"train.lora.rank": 0})


def test_hunyuanvideo_original_lora_names_merge_as_written(tmp_path: Path) -> None:
    """HunyuanVideo's original module names (fused img_attn_qkv / txt_attn_qkv, img_mlp.fc1, ...), as its own
    trainers write them: diffusers' HunyuanVideo loader splits each fused up-projection in three over one shared
    down-projection, and the merge is base + scale x up_part @ down on each of diffusers' modules."""
    model = tiny_transformer("hunyuan")
    base = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    d, r = 20, 3  # the tiny model's width (2 heads of 10); the adapter's rank
    g = torch.Generator().manual_seed(5)
    fused = {"img_attn_qkv": ("to_q", "to_k", "to_v"), "txt_attn_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
    plain = {"img_attn_proj": ("attn.to_out.0", d, d), "img_mlp.fc1": ("ff.net.0.proj", 4 * d, d),
             "img_mlp.fc2": ("ff.net.2", d, 4 * d)}
    tensors, want = {}, dict(base)
    for name, parts in fused.items():
        down, up = torch.randn(r, d, generator=g), torch.randn(3 * d, r, generator=g)
        tensors |= {f"diffusion_model.double_blocks.0.{name}.lora_A.weight": down,
                    f"diffusion_model.double_blocks.0.{name}.lora_B.weight": up}
        for part, up_part in zip(parts, up.chunk(3)):
            key = f"transformer.transformer_blocks.0.attn.{part}.weight"
            want[key] = base[key] + 0.6 * up_part @ down
    for name, (module, o, i) in plain.items():
        down, up = torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)
        tensors |= {f"diffusion_model.double_blocks.0.{name}.lora_A.weight": down,
                    f"diffusion_model.double_blocks.0.{name}.lora_B.weight": up}
        key = f"transformer.transformer_blocks.0.{module}.weight"
        want[key] = base[key] + 0.6 * up @ down
    path = tmp_path / "hunyuan_original.safetensors"
    save_file(tensors, str(path))
    merged = with_lora(base, {"dit": {"family": "hunyuan"}}, path, 0.6)
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == 9  # 2 x 3 split projections and 3 plain ones
    for k in want:
        torch.testing.assert_close(merged[k], want[k], atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_diffusers_lora_with_per_module_ranks_alphas_and_rslora_merges_as_peft_applies_it(release: Path,
                                                                                           tmp_path: Path) -> None:
    """A diffusers-layout file whose metadata (peft's LoraConfig) has rank_pattern, alpha_pattern and use_rslora: each
    module's update is alpha / sqrt(its rank) x B A, as peft computes it when diffusers loads the file."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from dit.models.lora import METADATA_KEY
    from dit.models.text import NoText
    from dit.released import release_config

    cfg = load_config(release / "wan.yaml", folders(release))
    base, config = release_weights(cfg), release_config(cfg)
    g = torch.Generator().manual_seed(7)
    shapes = {"blocks.0.attn1.to_q": (24, 24, 4), "blocks.1.ffn.net.2": (24, 32, 2)}
    tensors = {}
    for module, (o, i, r) in shapes.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(r, i, generator=g) * 0.3
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.3
    lora_config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"ffn.net.2": 2}, "alpha_pattern": {"ffn.net.2": 1.0},
                   "use_rslora": True, "target_modules": sorted(shapes), "lora_dropout": 0.0, "bias": "none",
                   "use_dora": False, "init_lora_weights": True}
    path = tmp_path / "patterns.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(
        {f"transformer.{k}": v for k, v in lora_config.items()})})
    merged = with_lora(base, config, path, 1.0)
    for module, alpha in (("blocks.0.attn1.to_q", 8.0), ("blocks.1.ffn.net.2", 1.0)):
        a, b = tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"]
        want = base[f"transformer.{module}.weight"] + alpha / a.shape[0] ** 0.5 * b @ a
        torch.testing.assert_close(merged[f"transformer.{module}.weight"], want, atol=1e-6, rtol=0)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=WanTransformer3DModel.from_pretrained(release / "transformer"))
    pipe.load_lora_weights(str(path))
    x, text = inputs(3)
    t = torch.tensor([500.0, 40.0])
    theirs = pipe.transformer.eval()(x, t, text, return_dict=False)[0]
    mine = load_pipeline(cfg, text=NoText(TEXT), lora=path).model(x, t, text, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
