"""Schedules: invariants, equality with diffusers' tables, and the x0 / eps / v conversions."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale
from diffusers.training_utils import compute_snr

from dit.diffusion.schedules import make_schedule, rescale_zero_terminal_snr, spaced_timesteps

SCALED = dict(beta_start=0.00085, beta_end=0.012)
CONFIGS = [  # (our name, kwargs, diffusers beta_schedule)
    ("linear", {}, "linear"),
    ("cosine", {}, "squaredcos_cap_v2"),
    ("scaled_linear", SCALED, "scaled_linear"),
]


@pytest.mark.parametrize("name,kwargs,_", CONFIGS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_decrease_strictly_within_0_1(name, kwargs, _, zero_snr):
    s = make_schedule(name, zero_terminal_snr=zero_snr, **kwargs)
    a = s.alphas_cumprod
    assert a.shape == s.betas.shape == (1000,) and s.num_timesteps == 1000
    assert a.dtype == s.betas.dtype == torch.float32
    assert (a[1:] < a[:-1]).all()
    assert a[0] <= 1
    if zero_snr:
        assert a[-1] == 0 and (a[:-1] > 0).all() and s.snr(torch.tensor([999])).item() == 0
    else:
        assert (a > 0).all()


@pytest.mark.parametrize("name,kwargs,diffusers_name", CONFIGS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_equal_diffusers(name, kwargs, diffusers_name, zero_snr):
    ours = make_schedule(name, zero_terminal_snr=zero_snr, **kwargs)
    theirs = DDPMScheduler(beta_schedule=diffusers_name, rescale_betas_zero_snr=zero_snr, **kwargs)
    # measured: bit-identical (max diff 0) for all six
    assert (ours.betas - theirs.betas).abs().max() <= 1e-6
    assert (ours.alphas_cumprod - theirs.alphas_cumprod).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_terminal_snr_equals_diffusers_rescale(dtype):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=dtype) ** 2
    ours, theirs = rescale_zero_terminal_snr(betas), diffusers_rescale(betas)
    assert torch.equal(ours, theirs)
    assert ours[-1] == 1  # abar_T = 0 exactly


@pytest.mark.parametrize("name,kwargs,_", CONFIGS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_conversions_invert_each_other(name, kwargs, _, zero_snr):
    s = make_schedule(name, zero_terminal_snr=zero_snr, **kwargs)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 1000, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.arange(1000)
    x_t, v = s.add_noise(x0, noise, t), s.v_target(x0, noise, t)
    for pred, kind in ((noise, "eps"), (v, "v"), (x0, "x0")):
        x0_hat, eps_hat = s.pred_to_x0_eps(pred, x_t, t, kind)
        ok = slice(0, 999) if zero_snr and kind == "eps" else slice(None)  # eps alone cannot give x0 at SNR 0
        torch.testing.assert_close(x0_hat[ok], x0[ok], atol=1e-9, rtol=0)
        torch.testing.assert_close(eps_hat, noise, atol=1e-9, rtol=0)
    torch.testing.assert_close(s.eps_to_x0(s.x0_to_eps(x0, x_t, t), x_t, t)[:999], x0[:999], atol=1e-9, rtol=0)
    torch.testing.assert_close(s.v_to_x0(v, x_t, t), x0, atol=1e-9, rtol=0)
    torch.testing.assert_close(s.v_to_eps(v, x_t, t), noise, atol=1e-9, rtol=0)
    assert torch.isfinite(s.eps_to_x0(noise, x_t, t)).all()  # the zero-SNR step divides by sqrt(2^-24), not 0


def test_eps_to_x0_at_zero_snr_uses_documented_floor():
    s = make_schedule("linear", zero_terminal_snr=True)
    x_t, eps, t = torch.ones(1, 3), torch.zeros(1, 3), torch.tensor([999])
    torch.testing.assert_close(s.eps_to_x0(eps, x_t, t), torch.full((1, 3), 2.0**12))


@pytest.mark.parametrize("name,kwargs,diffusers_name", CONFIGS)
def test_add_noise_v_target_snr_match_diffusers(name, kwargs, diffusers_name):
    ours, theirs = make_schedule(name, **kwargs), DDPMScheduler(beta_schedule=diffusers_name, **kwargs)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 8, 4, 3, 16, 16, generator=g)  # [B, C, T, H, W]
    t = torch.randint(0, 1000, (8,), generator=g)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.v_target(x0, noise, t), theirs.get_velocity(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.snr(t), compute_snr(theirs, t), rtol=1e-5, atol=0)
    assert ours.add_noise(x0, noise, t).dtype == torch.float32


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 30, 50, 1000])
def test_spaced_timesteps_equal_diffusers(spacing, steps):
    ddim = DDIMScheduler(timestep_spacing=spacing)
    ddim.set_timesteps(steps)
    assert spaced_timesteps(1000, steps, spacing) == ddim.timesteps.tolist()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="prediction"):
        make_schedule("linear").pred_to_x0_eps(torch.zeros(1), torch.zeros(1), torch.tensor([0]), "flow")


@pytest.mark.parametrize("zero_snr", [False, True])
def test_snr_shift_scale_equals_cogvideox_scheduler(zero_snr):
    """CogVideoX-2B's table: SNR divided by 3 at every step, then rescaled to zero terminal SNR."""
    from diffusers import CogVideoXDDIMScheduler

    ref = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", **SCALED, snr_shift_scale=3.0,
                                 rescale_betas_zero_snr=zero_snr)
    ours = make_schedule("scaled_linear", **SCALED, zero_terminal_snr=zero_snr, snr_shift_scale=3.0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.float(), atol=1e-7, rtol=0)  # float64 there
    if not zero_snr:  # what the scale means: SNR / 3 exactly (the zero-SNR rescale then moves it)
        t = torch.arange(0, 1000)
        torch.testing.assert_close(ours.snr(t), make_schedule("scaled_linear", **SCALED).snr(t) / 3, rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.cumprod(1 - ours.betas, 0), ours.alphas_cumprod, rtol=1e-5, atol=1e-7)
