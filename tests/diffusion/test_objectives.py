"""training_loss: exact targets give zero loss, weights and sampling of t are as documented, gradients flow."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from dit.diffusion.objectives import flow_loss, min_snr_weight, training_loss
from dit.diffusion.schedules import make_schedule

SCHEDULE = make_schedule("linear")


def data(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, b, 4, 3, 8, 8, generator=g)  # [B, C, T, H, W]
    return x0, noise, torch.randint(0, 1000, (b,), generator=g)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_oracle_model_has_zero_loss(prediction):
    x0, noise, t = data()
    seen = {}

    def oracle(x_t, t_in, **kwargs):
        seen.update(x_t=x_t, t=t_in, kwargs=kwargs)
        return {"eps": noise, "v": SCHEDULE.v_target(x0, noise, t_in), "x0": x0}[prediction]

    loss = training_loss(oracle, x0, SCHEDULE, prediction=prediction, t=t, noise=noise, model_kwargs={"text": 1})
    assert loss.ndim == 0 and loss.item() == 0.0
    assert torch.equal(seen["t"], t) and seen["kwargs"] == {"text": 1}
    torch.testing.assert_close(seen["x_t"], SCHEDULE.add_noise(x0, noise, t))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_value_is_per_sample_mean_then_batch_mean(prediction):
    x0, noise, t = data()
    target = noise if prediction == "eps" else SCHEDULE.v_target(x0, noise, t)
    loss = training_loss(lambda x, t: torch.zeros_like(x), x0, SCHEDULE, prediction=prediction, t=t, noise=noise)
    torch.testing.assert_close(loss, target.square().mean())
    snr = SCHEDULE.snr(t)
    w = (5 / snr).clamp(max=1) if prediction == "eps" else snr.clamp(max=5) / (snr + 1)
    weighted = training_loss(lambda x, t: torch.zeros_like(x), x0, SCHEDULE, prediction=prediction, t=t,
                             noise=noise, min_snr_gamma=5.0)
    torch.testing.assert_close(weighted, (target.square().flatten(1).mean(1) * w).mean())


def test_min_snr_weights_documented_values():
    t = torch.tensor([0, 200, 999])
    snr = SCHEDULE.snr(t)
    torch.testing.assert_close(snr, compute_snr(DDPMScheduler(), t), rtol=1e-5, atol=0)
    # snr 9997.3 at t=0 (9999 in exact arithmetic; the float32 table's 1 - abar_0 is 1.00017e-4), 4.04e-5 at t=999
    assert snr[0].item() == pytest.approx(9997.34, rel=1e-5) and snr[2].item() == pytest.approx(4.036e-5, rel=1e-3)
    eps, v, x0 = (min_snr_weight(snr, 5.0, p) for p in ("eps", "v", "x0"))
    assert eps[0].item() == pytest.approx(5.0013e-4, rel=1e-4) and eps[2].item() == 1.0
    assert v[0].item() == pytest.approx(5.0008e-4, rel=1e-4) and v[2].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert x0.tolist() == pytest.approx([5.0, min(snr[1].item(), 5.0), snr[2].item()])
    # eps weight = v weight * (snr + 1) / snr everywhere (they weight the same x0 error)
    torch.testing.assert_close(eps, v * (snr + 1) / snr)


def test_min_snr_weights_at_zero_terminal_snr_are_finite():
    s = make_schedule("linear", zero_terminal_snr=True)
    snr = s.snr(torch.tensor([999]))
    assert snr.item() == 0
    assert min_snr_weight(snr, 5.0, "eps").item() == 1.0
    assert min_snr_weight(snr, 5.0, "v").item() == 0.0


def test_sampled_t_and_noise_are_uniform_and_reproducible():
    seen = []
    model = lambda x, t: seen.append(t) or torch.zeros_like(x)
    x0 = torch.zeros(4096, 1)
    a = training_loss(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(0))
    b = training_loss(model, x0, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert a.item() == b.item() and torch.equal(seen[0], seen[1])
    t = seen[0]
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert abs(t.float().mean().item() - 499.5) < 15  # uniform: sd of the mean is 289 / 64 = 4.5
    assert a.item() == pytest.approx(1.0, abs=0.05)  # E[noise^2] with x0 = 0


def test_gradient_flows():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(4, 4, 3, padding=1)
    x0, noise, t = data()
    for prediction in ("eps", "v"):
        net.zero_grad()
        loss = training_loss(lambda x, t: net(x), x0, SCHEDULE, prediction=prediction, t=t, noise=noise,
                             min_snr_gamma=5.0)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in net.parameters())


def test_unknown_prediction_raises():
    with pytest.raises(ValueError, match="prediction"):
        training_loss(lambda x, t: x, torch.zeros(2, 3), SCHEDULE, prediction="flow")


# ---- flow_loss ---------------------------------------------------------------------------------------------------


def flow_data(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, b, 4, 3, 8, 8, generator=g)  # [B, C, T, H, W]
    return x0, noise, torch.rand(b, generator=g)


def test_flow_loss_exact_velocity_is_zero_and_the_model_sees_x_t_at_sigma_1000():
    x0, noise, sigma = flow_data()
    seen = {}

    def oracle(x_t, t, **kwargs):
        seen.update(x_t=x_t, t=t, kwargs=kwargs)
        return noise - x0

    loss = flow_loss(oracle, x0, sigma=sigma, noise=noise, model_kwargs={"text": 1})
    assert loss.ndim == 0 and loss.item() == 0.0
    assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], sigma * 1000) and seen["kwargs"] == {"text": 1}
    s = sigma.reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], (1 - s) * x0 + s * noise)


def test_flow_loss_equals_a_hand_computation():
    x0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # [B=2, 2]
    noise = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    sigma = torch.tensor([0.25, 1.0])
    # x_t: [0.875, 1.625], [1, 1]; model returns 2 x_t; target noise - x0: [-0.5, -1.5], [1, 2]
    # errors: [2.25, 4.75] -> (5.0625 + 22.5625) / 2 = 13.8125; [1, 0] -> 0.5; batch mean 7.15625
    loss = flow_loss(lambda x, t: 2 * x, x0, sigma=sigma, noise=noise)
    assert loss.item() == pytest.approx(7.15625, abs=1e-6)


def test_flow_loss_bf16_data_float32_arithmetic_and_gradients():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(4, 4, 3, padding=1)
    x0, noise, sigma = flow_data()
    loss = flow_loss(lambda x, t: net(x), x0, sigma=sigma, noise=noise)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    seen = []
    low = flow_loss(lambda x, t: seen.append(x.dtype) or torch.zeros_like(x), x0.bfloat16(), sigma=sigma,
                    noise=noise.bfloat16())
    assert seen == [torch.bfloat16] and low.dtype == torch.float32
    exact = (noise.bfloat16().float() - x0.bfloat16().float()).square().mean()
    torch.testing.assert_close(low, exact)


def test_flow_loss_weight_averages_each_sample_over_its_kept_elements():
    """weight 0 at frame 0 of the first sample (where Wan takes the image in its place): that sample's loss is the
    mean over frames 1.., whatever the model predicts at frame 0; the second (weight 1) is the plain mean."""
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(2, 3, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 0.8])
    weight = torch.ones(2, 1, 4, 1, 1)
    weight[0, :, 0] = 0
    err = (pred - (noise - x0)).square()
    want = (err[0, :, 1:].mean() + err[1].mean()) / 2
    got = flow_loss(lambda x, t: pred, x0, sigma=sigma, noise=noise, weight=weight)
    torch.testing.assert_close(got, want)
    moved = pred.clone()
    moved[0, :, 0] += 100.0
    torch.testing.assert_close(flow_loss(lambda x, t: moved, x0, sigma=sigma, noise=noise, weight=weight), want)
    torch.testing.assert_close(flow_loss(lambda x, t: pred, x0, sigma=sigma, noise=noise, weight=torch.ones(1)),
                               flow_loss(lambda x, t: pred, x0, sigma=sigma, noise=noise))
