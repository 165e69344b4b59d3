"""The flow settings of diffusion.* and sample.*, and how generate() picks a flow sampler, shift and mu for a flow
checkpoint (with stand-in model, VAE and text encoder: the wiring, not the networks)."""

import pytest
import torch
from torch import nn

from dit.config import ConfigError, DiffusionConfig, SampleConfig, load_config
from dit.diffusion.flow import dynamic_mu, flow_sigmas, flow_solver_grid
from dit.diffusion.schedules import make_schedule
from dit.pipeline import OBJECTIVE_SAMPLERS, SAMPLERS, Pipeline, generate, resolve_sampler

# ---- config ------------------------------------------------------------------------------------------------------


def test_defaults_keep_todays_diffusion_objective():
    d = DiffusionConfig()
    assert d.objective == "diffusion" and d.shift == 1.0 and not d.dynamic_shift
    assert (d.timestep_sampling, d.logit_mean, d.logit_std, d.mode_scale) == ("uniform", 0.0, 1.0, 1.29)
    assert (d.base_shift, d.max_shift, d.base_seq_len, d.max_seq_len) == (0.5, 1.15, 256, 4096)
    assert SampleConfig().sampler is None and SampleConfig().shift is None


def test_flow_settings_load_from_dotted_overrides():
    cfg = load_config(None, ["diffusion.objective=flow", "diffusion.timestep_sampling=logit_normal",
                             "diffusion.dynamic_shift=true", "sample.sampler=flow_dpm_solver", "sample.shift=5"])
    assert cfg.diffusion.objective == "flow" and cfg.diffusion.dynamic_shift
    assert cfg.sample.sampler == "flow_dpm_solver" and cfg.sample.shift == 5.0


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(objective="rectified"), r"diffusion\.objective: must be diffusion or flow"),
    (dict(objective="flow", timestep_sampling="cosmap"), r"diffusion\.timestep_sampling: must be uniform"),
    (dict(objective="flow", logit_std=0.0), r"diffusion\.logit_std: must be > 0"),
    (dict(objective="flow", mode_scale=2.0), r"diffusion\.mode_scale: must be in \[0, 1\.75\]"),
    (dict(objective="flow", shift=0.0), r"diffusion\.shift: must be > 0"),
    (dict(objective="flow", dynamic_shift=True, shift=3.0), r"diffusion\.shift: is 3\.0 but .*dynamic_shift"),
    (dict(objective="flow", base_seq_len=4096), r"diffusion\.base_seq_len: must be >= 1 and below .*4096"),
    (dict(objective="flow", prediction="v"), r"diffusion\.prediction: is 'v', but .*flow always predicts"),
    (dict(objective="flow", min_snr_gamma=5.0), r"diffusion\.min_snr_gamma: is for diffusion\.objective=diffusion"),
    (dict(shift=3.0), r"diffusion\.shift: is only used by the flow objective"),
    (dict(timestep_sampling="logit_normal"), r"diffusion\.timestep_sampling: is only used by the flow objective"),
    (dict(dynamic_shift=True), r"diffusion\.dynamic_shift: is only used by the flow objective"),
])
def test_bad_diffusion_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionConfig(**kwargs)


def test_sample_settings():
    for name in SAMPLERS:
        assert SampleConfig(sampler=name).sampler == name  # the config accepts exactly the pipeline's samplers
    with pytest.raises(ConfigError, match=r"sample\.sampler: must be ddim, .*flow_euler, flow_dpm_solver"):
        SampleConfig(sampler="flow_heun")
    with pytest.raises(ConfigError, match=r"sample\.shift: must be > 0 or null"):
        SampleConfig(shift=-1.0)


# ---- sampler choice ------------------------------------------------------------------------------------------------


def test_resolve_sampler():
    assert sorted(s for group in OBJECTIVE_SAMPLERS.values() for s in group) == sorted(SAMPLERS)
    assert resolve_sampler("diffusion", None) == "ddim" and resolve_sampler("flow", None) == "flow_euler"
    assert resolve_sampler("flow", "flow_dpm_solver") == "flow_dpm_solver"
    with pytest.raises(ValueError, match=r"'ddim' does not fit .*objective=flow: use one of flow_euler"):
        resolve_sampler("flow", "ddim")
    with pytest.raises(ValueError, match=r"'flow_euler' does not fit .*objective=diffusion: use one of ddim"):
        resolve_sampler("diffusion", "flow_euler")
    with pytest.raises(ValueError, match="unknown sampler"):
        resolve_sampler("flow", "euler")


# ---- generate() with a flow checkpoint ---------------------------------------------------------------------------


class RecordingModel(nn.Module):
    """Velocity 0 everywhere (the sample stays the noise); records the timesteps each call gets."""

    patch = (1, 2, 2)

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, text, text_mask):
        self.calls.append(t.clone())
        return torch.zeros_like(x)


class IdentityVAE:
    latent_channels, temporal_compression, spatial_compression = 3, 4, 8

    def latent_shape(self, frames, height, width):
        return 1 + (frames - 1) // 4, height // 8, width // 8

    def denormalize(self, z):
        return z

    def decode(self, z, chunk_size=0):
        return z


class ZeroText:
    def encode(self, prompts):
        return torch.zeros(len(prompts), 3, 8), torch.ones(len(prompts), 3, dtype=torch.bool)


def flow_pipe(**diffusion) -> Pipeline:
    return Pipeline(RecordingModel(), IdentityVAE(), ZeroText(), make_schedule("linear"), "eps", {},
                    DiffusionConfig(objective="flow", **diffusion))


def timesteps_seen(pipe: Pipeline, **kwargs) -> torch.Tensor:
    """The distinct per-step timesteps the model saw (the guided batch repeats each one 2B times)."""
    generate(pipe, ["a", "b"], frames=1, height=128, width=128, steps=6, **kwargs)  # 16 x 16 latents: 64 tokens
    assert all(t.dtype == torch.float32 and t.shape == (4,) and (t == t[0]).all() for t in pipe.model.calls)
    return torch.stack([t[0] for t in pipe.model.calls])


def test_generate_flow_uses_the_training_shift():
    torch.testing.assert_close(timesteps_seen(flow_pipe(shift=3.0)), flow_sigmas(6, shift=3.0)[:-1] * 1000)


def test_generate_flow_sample_shift_overrides_it():
    torch.testing.assert_close(timesteps_seen(flow_pipe(shift=3.0), shift=5.0), flow_sigmas(6, shift=5.0)[:-1] * 1000)


def test_generate_flow_dynamic_shift_from_the_latent_token_count():
    mu = dynamic_mu(64)  # 16 x 16 latents under a 1 x 2 x 2 patch: 64 tokens
    torch.testing.assert_close(timesteps_seen(flow_pipe(dynamic_shift=True)), flow_sigmas(6, mu=mu)[:-1] * 1000)


def test_generate_flow_dpm_solver():
    seen = timesteps_seen(flow_pipe(shift=3.0), sampler="flow_dpm_solver")
    torch.testing.assert_close(seen, flow_solver_grid(6, shift=3.0)[1].float())


def test_generate_with_velocity_zero_returns_the_noise():
    """A zero velocity leaves x = noise (the flow samplers ran, not DDIM: its eps = 0 would scale the noise)."""
    video = generate(flow_pipe(), ["a"], frames=1, height=16, width=16, steps=3, cfg=1.0, seed=7)
    noise = torch.randn((1, 3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(video, noise.clamp(-1, 1))


def test_generate_refuses_mismatches():
    with pytest.raises(ValueError, match="does not fit"):
        generate(flow_pipe(), ["a"], frames=1, height=16, width=16, steps=2, sampler="ddim")
    diffusion = Pipeline(RecordingModel(), IdentityVAE(), ZeroText(), make_schedule("linear"), "eps", {})
    assert diffusion.diffusion.objective == "diffusion"  # the six-field construction keeps today's objective
    with pytest.raises(ValueError, match="does not fit"):
        generate(diffusion, ["a"], frames=1, height=16, width=16, steps=2, sampler="flow_euler")
    with pytest.raises(ValueError, match="shift=3.0 is for flow samplers"):
        generate(diffusion, ["a"], frames=1, height=16, width=16, steps=2, shift=3.0)
