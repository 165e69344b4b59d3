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
