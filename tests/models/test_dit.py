import copy

import pytest
import torch
from einops import rearrange

from dit.config import ModelConfig
from dit.distributed.parallelize import apply_activation_checkpointing
from dit.models.dit import DiT, build_dit, patchify, unfused_state_dict, unpatchify
from dit.models.embeddings import apply_rope, rope_3d, rope_axis_dims, sincos_3d
from dit.training.metrics import saved_tensor_bytes


def _inputs(b=2, grid=(3, 4, 6), c=4, L=5, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *grid, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, L, d, generator=g)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[:, -2:] = False
    return x, t, text, mask


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 1, 1), (1, 1, 1)])
def test_patchify_unpatchify_round_trip(patch):
    x = torch.randn(2, 4, 4, 6, 8)
    tokens = patchify(x, patch)
    grid = (4 // patch[0], 6 // patch[1], 8 // patch[2])
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 4 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch), x)
    # token order is (t h w): the first token holds the top-left patch of the first latent frame
    assert torch.equal(tokens[0, 0].reshape(4, *patch), x[0, :, :patch[0], :patch[1], :patch[2]])


def test_fresh_dit_outputs_zeros():
    model = DiT(text_dim=16)
    x, t, text, mask = _inputs()
    out = model(x, t, text, mask)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("grid", [(1, 2, 2), (3, 4, 6), (5, 8, 4), (2, 6, 10)])
def test_one_model_runs_at_many_latent_grids(grid):
    torch.manual_seed(0)
    model = DiT(text_dim=16)
    _randomize(model)
    x, t, text, mask = _inputs(grid=grid)
    out = model(x, t, text, mask)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_grid_not_divisible_by_patch_is_refused():
    model = DiT(text_dim=16, patch_size=(1, 2, 2))
    x, t, text, mask = _inputs(grid=(3, 5, 6))
    with pytest.raises(ValueError, match="not divisible"):
        model(x, t, text, mask)


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 24
    cos, sin = rope_3d((4, 5, 6), head_dim)
    q = torch.randn(head_dim).expand(1, 1, 4 * 5 * 6, head_dim)
    k = torch.randn(head_dim).expand(1, 1, 4 * 5 * 6, head_dim)
    qr, kr = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]
    idx = lambda t, h, w: (t * 5 + h) * 6 + w
    a = qr[idx(1, 1, 1)] @ kr[idx(2, 3, 2)]
    b = qr[idx(2, 0, 3)] @ kr[idx(3, 2, 4)]  # same offset (1, 2, 1)
    c = qr[idx(2, 0, 3)] @ kr[idx(3, 2, 5)]  # different offset
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-3)
    # rotation preserves norms
    assert torch.allclose(qr.norm(dim=-1), q[0, 0].norm(dim=-1), atol=1e-4)


def test_masked_text_tokens_do_not_matter_and_text_does():
    torch.manual_seed(0)
    model = DiT(text_dim=16)
    _randomize(model)
    x, t, text, mask = _inputs()
    out = model(x, t, text, mask)
    text2 = text.clone()
    text2[:, -2:] = torch.randn_like(text2[:, -2:]) * 10  # masked positions
    assert torch.allclose(model(x, t, text2, mask), out, atol=1e-5)
    text3 = text.clone()
    text3[:, 0] += 1.0  # an attended position
    assert not torch.allclose(model(x, t, text3, mask), out, atol=1e-4)


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_same_output_and_grads(every: int):
    torch.manual_seed(0)
    a = DiT(text_dim=16)
    _randomize(a)
    b = DiT(text_dim=16)
    b.load_state_dict(a.state_dict())
    apply_activation_checkpointing(b, every)
    x, t, text, mask = _inputs()
    la, lb = a(x, t, text, mask).square().mean(), b(x, t, text, mask).square().mean()
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    ga = dict(a.named_parameters())
    assert [n for n, _ in b.named_parameters()] == list(ga)  # the same names: no key fixing anywhere
    assert list(b.state_dict()) == list(a.state_dict())
    for name, p in b.named_parameters():
        assert torch.allclose(p.grad, ga[name].grad, atol=1e-6), name


def test_checkpointing_every_kth_block_keeps_the_other_blocks_activations():
    """Blocks 0, k, 2k, ... are recomputed: saved activations fall with the share of recomputed blocks."""
    x, t, text, mask = _inputs()
    saved = {}
    for every in (0, 1, 2, 4):
        torch.manual_seed(0)
        model = DiT(text_dim=16, depth=4)
        if every:
            apply_activation_checkpointing(model, every)
        _, saved[every] = saved_tensor_bytes(lambda m=model: m(x, t, text, mask), exclude=list(model.parameters()))
    per_block = (saved[0] - saved[1]) / 4  # what one block keeps, above its checkpointed input
    assert per_block > 0
    assert saved[2] == pytest.approx(saved[1] + 2 * per_block, rel=0.02)  # blocks 1, 3 keep theirs
    assert saved[4] == pytest.approx(saved[1] + 3 * per_block, rel=0.02)  # blocks 1, 2, 3


def test_presets_build_and_overrides_apply():
    m = build_dit(ModelConfig(preset="dit-tiny", depth=2, hidden_size=64, num_heads=2), in_channels=4, text_dim=16)
    assert len(m.blocks) == 2 and m.config["hidden_size"] == 64
    s = build_dit(ModelConfig(preset="DiT-S/2"), in_channels=4, text_dim=384)
    n = sum(p.numel() for p in s.parameters())
    assert 30e6 < n < 60e6  # DiT-S/2 is ~33M in the image paper; cross-attention adds about a third
    assert s.patch == (1, 2, 2)


def test_sincos_positions_are_unique_and_per_axis() -> None:
    grid = (3, 4, 5)
    pos = sincos_3d(grid, 48)  # [60, 48], axis parts (t, h, w) = (16, 16, 16)
    assert pos.shape == (60, 48)
    assert torch.cdist(pos, pos).add(torch.eye(60)).min() > 1e-3  # every token has its own position
    cells = rearrange(pos, "(t h w) d -> t h w d", t=3, h=4, w=5)
    dt, dh, _ = rope_axis_dims(48)
    assert torch.equal(cells[1, 0, 0, :dt], cells[1, 3, 4, :dt])  # the time part depends on t only
    assert torch.equal(cells[0, 2, 0, dt:dt + dh], cells[2, 2, 4, dt:dt + dh])  # the height part on h only
    corner = cells[:2, :2, :2].reshape(8, 48)  # a smaller grid's positions are the larger grid's corner
    assert torch.equal(sincos_3d((2, 2, 2), 48), corner)



def test_fused_qkv_computes_the_plain_outputs_and_gradients():
    """model.fused_qkv: self-attention's q and kv as one layer whose weight is the two stacked; the same output, and
    its gradient is the two gradients stacked."""
    plain = DiT(text_dim=16)
    _randomize(plain)
    fused = copy.deepcopy(plain).fuse_qkv()
    attn = fused.blocks[0].attn
    assert attn.fused and not hasattr(attn, "q") and attn.qkv.weight.shape == (3 * 128, 128)
    assert not fused.blocks[0].cross.fused  # cross-attention's q and kv read different inputs
    with pytest.raises(ValueError, match="fused"):
        attn(torch.randn(1, 4, 128), context=torch.randn(1, 3, 128))
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    x, t, text, mask = _inputs()
    out_p, out_f = plain(x, t, text, mask), fused(x, t, text, mask)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    out_p.square().mean().backward()
    out_f.square().mean().backward()
    for i, block in enumerate(plain.blocks):
        stacked = torch.cat([block.attn.q.weight.grad, block.attn.kv.weight.grad])
        torch.testing.assert_close(fused.blocks[i].attn.qkv.weight.grad, stacked, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(fused.blocks[i].attn.qkv.bias.grad,
                                   torch.cat([block.attn.q.bias.grad, block.attn.kv.bias.grad]), atol=1e-6, rtol=1e-4)


def test_fused_qkv_state_loads_either_layout_and_exports_the_plain_one():
    plain = DiT(text_dim=16)
    _randomize(plain, seed=1)
    fused = DiT(text_dim=16).fuse_qkv()
    fused.load_state_dict(plain.state_dict())  # an export (plain layout) into a fused model
    x, t, text, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, text, mask), plain(x, t, text, mask), atol=1e-5, rtol=1e-5)
    exported = unfused_state_dict(fused.state_dict())
    assert sorted(exported) == sorted(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(exported[key], value), key
    assert exported["blocks.0.attn.q.weight"].untyped_storage().data_ptr() != \
        exported["blocks.0.attn.kv.weight"].untyped_storage().data_ptr()  # safetensors refuses shared storage
    again = DiT(text_dim=16)
    again.load_state_dict(fused.state_dict())  # a fused model's state into a plain one
    for key, value in plain.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    twin = copy.deepcopy(fused)  # as the EMA is made: its loads convert too
    twin.load_state_dict(plain.state_dict())
    assert torch.equal(twin.blocks[1].attn.qkv.weight, fused.blocks[1].attn.qkv.weight)
