import json
import os

import pytest
import torch

from dit.models.vae import CausalVAE, DiagonalGaussian, chroma_error, load_vae, save_vae, vae_loss

TINY = dict(latent_channels=4, base_channels=8, channel_mults=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models are overhead-bound: 2 OpenMP threads gain nothing and, on a busy 2-core machine,
    spin-wait for each other (the overfit test went from 5 s to 80 s). Restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae() -> CausalVAE:
    torch.manual_seed(0)
    return CausalVAE(**TINY).eval()


def moving_square(batch: int, frames: int, size: int, side: int) -> torch.Tensor:
    """[B, 3, T, size, size] in [-1, 1]: a white square moving 2 px per frame on a black background."""
    x = -torch.ones(batch, 3, frames, size, size)
    for b in range(batch):
        for t in range(frames):
            top, left = 2 + b * 6, 2 + 2 * t
            x[b, :, t, top : top + side, left : left + side] = 1.0
    return x


# ---- frame and shape arithmetic -----------------------------------------------------------------------------
@pytest.mark.parametrize("frames, latent", [(1, 1), (5, 2), (9, 3), (17, 5)])
def test_latent_frames(frames: int, latent: int) -> None:
    assert CausalVAE.latent_frames(frames) == latent


@pytest.mark.parametrize("frames, nearest", [(6, ["5", "9"]), (4, ["1", "5"]), (0, ["1"])])
def test_invalid_frames_name_nearest_valid(frames: int, nearest: list[str]) -> None:
    with pytest.raises(ValueError, match="4k\\+1") as err:
        CausalVAE.latent_frames(frames)
    for n in nearest:
        assert n in str(err.value)


def test_latent_shape_and_invalid_size() -> None:
    assert CausalVAE.latent_shape(17, 64, 40) == (5, 8, 5)
    assert CausalVAE.latent_shape(1, 8, 8) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"height=30.*\[24, 32\]"):
        CausalVAE.latent_shape(5, 30, 32)


@pytest.mark.parametrize("frames", [1, 5, 17])
@pytest.mark.parametrize("height, width", [(16, 24), (40, 8)])
def test_encode_decode_shapes(vae: CausalVAE, frames: int, height: int, width: int) -> None:
    x = torch.rand(2, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x)
        t, h, w = CausalVAE.latent_shape(frames, height, width)
        assert posterior.mean.shape == posterior.logvar.shape == (2, 4, t, h, w)
        recon, _ = vae(x)
    assert recon.shape == x.shape


def test_encode_rejects_bad_input(vae: CausalVAE) -> None:
    with pytest.raises(ValueError, match=r"\[5, 9\]"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="expected"):
        vae.encode(torch.zeros(1, 1, 5, 16, 16))


# ---- causality ----------------------------------------------------------------------------------------------
def test_encoder_is_causal(vae: CausalVAE) -> None:
    torch.manual_seed(1)
    x = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    y = x.clone()
    y[:, :, 9] = -y[:, :, 9]  # frame 9 belongs to latent frame 3 (frames 9..12)
    with torch.no_grad():
        zx, zy = vae.encode(x).mean, vae.encode(y).mean
    diff = (zx - zy).abs().amax(dim=(0, 1, 3, 4))  # [t]
    assert diff[:3].max() <= 1e-6  # latent frames 0..2 only see frames 0..8
    assert (diff[3:] > 1e-4).all()


def test_image_is_first_frame_of_video(vae: CausalVAE) -> None:
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        video, image = vae.encode(x).mean, vae.encode(x[:, :, :1]).mean
        assert torch.allclose(video[:, :, :1], image, atol=1e-6)
        assert (vae.decode(video)[:, :, :1] - vae.decode(image)).abs().max() <= 1e-5  # fp32 round-off only


def test_decoder_is_causal(vae: CausalVAE) -> None:
    torch.manual_seed(2)
    z = torch.randn(1, 4, 5, 2, 3)
    z2 = z.clone()
    z2[:, :, 2] += 1.0  # latent frame 2 decodes to frames 5..8
    with torch.no_grad():
        a, b = vae.decode(z), vae.decode(z2)
    diff = (a - b).abs().amax(dim=(0, 1, 3, 4))  # [17]
    assert diff[:5].max() <= 1e-6
    assert (diff[5:9] > 1e-4).all()


# ---- chunked decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 8])
def test_chunked_decode_equals_full(vae: CausalVAE, chunk_size: int) -> None:
    torch.manual_seed(3)
    z = torch.randn(2, 4, 5, 2, 3)
    with torch.no_grad():
        full = vae.decode(z)
        chunked = vae.decode(z, chunk_size=chunk_size)
        again = vae.decode(z)  # the cache is cleared on exit
    assert chunked.shape == full.shape == (2, 3, 17, 16, 24)
    assert (chunked - full).abs().max() <= 1e-5
    assert torch.equal(again, full)


def test_chunked_decode_of_an_image(vae: CausalVAE) -> None:
    z = torch.randn(1, 4, 1, 2, 2)
    with torch.no_grad():
        assert (vae.decode(z, chunk_size=1) - vae.decode(z)).abs().max() <= 1e-5


# ---- posterior, loss, latent statistics ---------------------------------------------------------------------
def test_diagonal_gaussian() -> None:
    zeros = torch.zeros(2, 4, 1, 2, 2)
    std_normal = DiagonalGaussian(zeros, zeros)
    assert torch.equal(std_normal.kl(), torch.zeros(2))
    # KL(N(1, e^2) || N(0, 1)) per element = 0.5 * (1 + e^2 - 1 - 2) = 0.5 * (e^2 - 2)
    shifted = DiagonalGaussian(torch.ones(2, 4, 1, 2, 2), torch.full((2, 4, 1, 2, 2), 2.0))
    expected = 0.5 * (torch.exp(torch.tensor(2.0)) - 2.0)
    assert torch.allclose(shifted.kl(), expected.expand(2))
    assert torch.equal(shifted.mode(), shifted.mean)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(shifted.sample(g1), shifted.sample(g2))
    samples = DiagonalGaussian(torch.full((4000,), 3.0), torch.zeros(4000)).sample(torch.Generator().manual_seed(0))
    assert abs(samples.mean().item() - 3.0) < 0.1 and abs(samples.std().item() - 1.0) < 0.1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_posterior_sample_draws_its_noise_from_the_cpu_generator(device: str) -> None:
    """The same generator state gives the same draw whatever device the posterior is on."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    mean, logvar = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    expected = mean + torch.exp(0.5 * logvar) * noise
    got = DiagonalGaussian(mean.to(device), logvar.to(device)).sample(torch.Generator().manual_seed(5))
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), expected)


def test_vae_loss_parts() -> None:
    x = torch.zeros(1, 3, 1, 8, 8)
    recon = torch.full_like(x, 0.5)
    posterior = DiagonalGaussian(torch.ones(1, 4, 1, 1, 1), torch.zeros(1, 4, 1, 1, 1))  # KL = 0.5
    loss, parts = vae_loss(recon, x, posterior, kl_weight=0.1)
    assert parts["l1"].item() == pytest.approx(0.5)
    assert parts["mse"].item() == pytest.approx(0.25)
    assert parts["kl"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.5 + 0.25 + 0.05)
    assert parts["chroma"].item() == 0.0  # a grey error has no hue


def test_chroma_term_sees_hue_errors_only() -> None:
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1, 1).expand(2, 3, 1, 4, 4)
    olive = torch.tensor([0.0, 0.0, -1.0]).view(1, 3, 1, 1, 1).expand(2, 3, 1, 4, 4)
    posterior = DiagonalGaussian(torch.zeros(2, 4, 1, 1, 1), torch.zeros(2, 4, 1, 1, 1))  # KL = 0
    # red drawn as olive: error (-1, 1, 0) -> red-green (-1 - 1) / 2 = -1, yellow-blue (-1 + 1) / 4 = 0
    assert chroma_error(olive, red).item() == pytest.approx((1.0 + 0.0) / 2)
    loss, parts = vae_loss(olive, red, posterior, kl_weight=1.0, l1_weight=0.0, chroma_weight=4.0)
    assert parts["mse"].item() == pytest.approx(2 / 3)
    assert loss.item() == pytest.approx(2 / 3 + 4.0 * 0.5)
    grey = red + 0.3  # the same error in every channel: brightness, not hue
    assert chroma_error(grey, red).item() == pytest.approx(0.0, abs=1e-12)


def test_latent_normalisation() -> None:
    vae = CausalVAE(**TINY)
    assert torch.equal(vae.latent_mean, torch.zeros(4)) and torch.equal(vae.latent_std, torch.ones(4))
    z = torch.randn(8, 4, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1, 1) + 5.0
    assert torch.equal(vae.normalize(z), z)  # identity by default
    vae.fit_latent_stats(z)
    n = vae.normalize(z)
    assert torch.allclose(n.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(n.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-5)
    assert torch.allclose(vae.denormalize(n), z, atol=1e-5)


# ---- save / load --------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(4)
    vae = CausalVAE(**TINY).eval()
    vae.fit_latent_stats(torch.randn(2, 4, 2, 2, 2) * 3 + 1)
    save_vae(vae, tmp_path / "vae")
    assert sorted(os.listdir(tmp_path / "vae")) == ["vae.json", "vae.safetensors"]  # no temp files left
    assert json.loads((tmp_path / "vae" / "vae.json").read_text())["channel_mults"] == [1, 2, 2, 2]

    loaded = load_vae(tmp_path / "vae")
    assert loaded.config == vae.config
    assert torch.equal(loaded.latent_mean, vae.latent_mean) and torch.equal(loaded.latent_std, vae.latent_std)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x, sample_posterior=False)[0], vae(x, sample_posterior=False)[0])
    save_vae(loaded, tmp_path / "vae")  # overwriting in place works
    assert sorted(os.listdir(tmp_path / "vae")) == ["vae.json", "vae.safetensors"]


# ---- learning -----------------------------------------------------------------------------------------------
def test_overfits_a_moving_square() -> None:
    torch.manual_seed(0)
    vae = CausalVAE(**TINY)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    x = moving_square(batch=2, frames=5, size=32, side=12)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        recon, posterior = vae(x, generator=generator)
        loss, parts = vae_loss(recon, x, posterior, kl_weight=1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0], losses
    # better than any constant image (whose MSE is at least the variance): it has learned where the square is
    assert parts["mse"].item() < 0.6 * x.var().item(), parts
