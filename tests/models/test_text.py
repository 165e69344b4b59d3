import pytest
import torch

from dit.config import TextConfig
from dit.models.text import HFTextEncoder, build_text_encoder, minilm_path


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(TextConfig(encoder="minilm", max_length=16))


def test_minilm_shapes_mask_and_padding(minilm):
    states, mask = minilm.encode(["a red circle moving left", "", "a much longer prompt " * 20])
    assert states.shape == (3, 16, 384) and mask.shape == (3, 16) and mask.dtype == torch.bool
    assert mask[0].sum() == 7 and mask[1].sum() == 2 and mask[2].all()  # [CLS] + 5 words + [SEP]; "" -> 2; truncated
    assert torch.isfinite(states).all()


def test_minilm_is_a_real_encoder(minilm):
    """Real weights: pooled embeddings of related prompts are closer than of unrelated ones, and match the reference
    sentence-transformers pipeline (mean pooling over the same model)."""
    prompts = ["a red circle moving left", "a red circle moving right", "quarterly tax filing deadline"]
    states, mask = minilm.encode(prompts)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(prompts, convert_to_tensor=True)
    ref = torch.nn.functional.normalize(ref.float(), dim=-1)
    assert torch.allclose(pooled, ref, atol=1e-4)


def test_cache_returns_identical_results(minilm):
    a, ma = minilm.encode(["a blue square moving up", "a white triangle moving down"])
    b, mb = minilm.encode(["a white triangle moving down", "a blue square moving up"])
    assert torch.equal(a[0], b[1]) and torch.equal(ma[1], mb[0])


def test_hf_encoder_from_local_folder_matches_minilm(minilm):
    hf = build_text_encoder(TextConfig(encoder="hf", path=str(minilm_path()), max_length=16))
    a, _ = hf.encode(["a green circle"])
    b, _ = minilm.encode(["a green circle"])
    assert torch.allclose(a, b)


def test_hf_encoder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTextEncoder(tmp_path)


def test_none_encoder():
    enc = build_text_encoder(TextConfig(encoder="none"))
    s, m = enc.encode(["x", ""])
    assert s.shape == (2, 1, enc.dim) and torch.count_nonzero(s) == 0 and m.all()


# ---- the families' T5 / UMT5 encoders from local folders, against the diffusers pipelines' prompt embeddings ----
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def tiny_t5_folder(root, kind: str, tokenizer_beside: bool):
    """A random tiny T5 / UMT5 encoder saved with save_pretrained in ROOT/text_encoder, with the packaged MiniLM
    tokenizer (no hub here) beside it or in a diffusers pipeline's sibling ROOT/tokenizer. Returns the folder."""
    import shutil

    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if kind == "umt5" else (T5Config, T5EncoderModel)
    torch.manual_seed(0)
    config = config_cls(vocab_size=30522, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0)
    folder = root / "text_encoder"
    model_cls(config).save_pretrained(folder)
    tok_dir = folder if tokenizer_beside else root / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, tok_dir)
    return folder


PROMPTS = ["a red circle moving left", "", "a  blue &amp; white\n square moving up " * 5]


def test_wan_umt5_states_are_wan_pipelines_prompt_embeds(tmp_path):
    from diffusers import WanPipeline
    from transformers import UMT5EncoderModel

    folder = tiny_t5_folder(tmp_path, "umt5", tokenizer_beside=False)  # Wan-Diffusers layout: tokenizer/ beside
    enc = build_text_encoder(TextConfig(encoder="hf", path=str(folder), max_length=24, padding="zeros", clean=True))
    assert isinstance(enc.model, UMT5EncoderModel) and enc.dim == 16
    states, mask = enc.encode(PROMPTS)  # [3, 24, 16], [3, 24]
    pipe = WanPipeline(tokenizer=enc.tokenizer, text_encoder=enc.model, transformer=None, vae=None, scheduler=None)
    ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=24, device=torch.device("cpu"))
    torch.testing.assert_close(states, ref, rtol=1e-5, atol=1e-6)
    assert states.shape == (3, 24, 16) and mask.sum(1).tolist() == [7, 2, 24]  # [CLS] 5 words [SEP]; ""; cut
    assert torch.count_nonzero(states[0, 7:]) == 0 and torch.count_nonzero(states[0, :7].abs().sum(-1)) == 7
    masked_only, _ = build_text_encoder(TextConfig(encoder="hf", path=str(folder), max_length=24)).encode(PROMPTS)
    torch.testing.assert_close(masked_only[0, :7], states[0, :7])  # the same real tokens, garbage after them
    assert torch.count_nonzero(masked_only[0, 7:]) > 0


@pytest.mark.parametrize("family", ["cogvideox", "ltx"])
def test_t5_states_are_cogvideox_and_ltx_pipelines_prompt_embeds(tmp_path, family):
    from diffusers import CogVideoXPipeline, LTXPipeline
    from transformers import T5EncoderModel

    folder = tiny_t5_folder(tmp_path, "t5", tokenizer_beside=True)
    length = 20
    enc = build_text_encoder(TextConfig(encoder="hf", path=str(folder), max_length=length, padding="unmasked"))
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 16
    states, mask = enc.encode(PROMPTS)
    parts = dict(tokenizer=enc.tokenizer, text_encoder=enc.model, transformer=None, vae=None, scheduler=None)
    if family == "cogvideox":
        ref = CogVideoXPipeline(**parts)._get_t5_prompt_embeds(PROMPTS, max_sequence_length=length,
                                                               device=torch.device("cpu"))
    else:
        ref, ref_mask = LTXPipeline(**parts)._get_t5_prompt_embeds(PROMPTS, max_sequence_length=length,
                                                                   device=torch.device("cpu"))
        assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(states, ref, rtol=1e-5, atol=1e-6)
    assert mask.sum(1).tolist() == [7, 2, length] and torch.count_nonzero(states[0, 7:].abs().sum(-1)) == length - 7
    masked, _ = build_text_encoder(TextConfig(encoder="hf", path=str(folder), max_length=length)).encode(PROMPTS)
    assert not torch.allclose(masked[0, :7], states[0, :7])  # the real tokens attended to the padding


def test_hf_encoder_without_a_tokenizer_names_the_fix(tmp_path):
    folder = tiny_t5_folder(tmp_path, "t5", tokenizer_beside=True)
    for name in TOKENIZER_FILES:
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*text_encoder.* nor in .*tokenizer"):
        HFTextEncoder(folder)


def test_text_dtype_holds_the_encoder_as_the_pipelines_load_it(tmp_path):
    from diffusers import WanPipeline
    from transformers import UMT5EncoderModel

    folder = tiny_t5_folder(tmp_path / "umt5", "umt5", tokenizer_beside=False)
    settings = dict(encoder="hf", path=str(folder), max_length=24, padding="zeros", clean=True)
    enc = build_text_encoder(TextConfig(**settings, dtype="bf16"))
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    states, _ = enc.encode(PROMPTS)
    assert states.dtype == torch.float32  # what the denoiser and the latent shards take, whatever text.dtype
    umt5 = UMT5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16)  # as WanPipeline(torch_dtype=bf16) has it
    pipe = WanPipeline(tokenizer=enc.tokenizer, text_encoder=umt5, transformer=None, vae=None, scheduler=None)
    with torch.no_grad():  # as inside the pipeline's __call__ (with grad on, SDPA takes another bf16 kernel)
        ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=24, device=torch.device("cpu"))
    assert ref.dtype == torch.bfloat16
    torch.testing.assert_close(states, ref.float(), rtol=0, atol=0)
    full, _ = build_text_encoder(TextConfig(**settings)).encode(PROMPTS)
    assert not torch.equal(states, full)  # bf16 took effect, and stays near the fp32 encoder
    torch.testing.assert_close(states, full, rtol=0.05, atol=0.05)

    # fp16: transformers keeps T5's feed-forward output layers (its _keep_in_fp32_modules) in fp32, against overflow
    t5 = tiny_t5_folder(tmp_path / "t5", "t5", tokenizer_beside=True)
    half = build_text_encoder(TextConfig(encoder="hf", path=str(t5), max_length=20, padding="unmasked", dtype="fp16"))
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith(".wo.weight")} == {torch.float32}
    assert dtypes["shared.weight"] == torch.float16
    assert torch.isfinite(half.encode(PROMPTS)[0]).all()


def test_an_encoder_overflowing_its_dtype_stops_with_the_fix(tmp_path):
    """A T5 whose embedding exceeds fp16's range gives finite states in fp32 (its RMS norm rescales them) and infinite
    ones in fp16: the first encode names text.dtype instead of handing NaN states to every step."""
    from transformers import T5EncoderModel

    folder = tiny_t5_folder(tmp_path, "t5", tokenizer_beside=True)
    model = T5EncoderModel.from_pretrained(folder)
    with torch.no_grad():
        model.shared.weight.mul_(1e6)  # beyond fp16's 65504
    model.save_pretrained(folder)
    settings = dict(encoder="hf", path=str(folder), max_length=20, padding="unmasked")
    states, _ = build_text_encoder(TextConfig(**settings)).encode(PROMPTS)
    assert torch.isfinite(states).all()
    with pytest.raises(ValueError, match=r"non-finite states in text\.dtype=fp16 .*use text\.dtype=bf16 or fp32"):
        build_text_encoder(TextConfig(**settings, dtype="fp16")).encode(PROMPTS)
