"""text.device=cpu: the frozen text encoder stays in host memory (Wan's --t5_cpu) and its states go to the model's
device; `dit plan` leaves it out of the GPU's memory. The transfer itself runs on a CUDA machine (gpu-marked;
`tools/gpu_check.sh --cpu` runs it on the CPU with DIT_GPU_TESTS_ON_CPU=1)."""

from __future__ import annotations

import os

import pytest
import torch

from dit.config import ConfigError, DiffusionConfig, TextConfig, load_config
from dit.models.text import NoText, text_device
from dit.models.vae import CausalVAE
from dit.plan import MINILM, estimate, model_size
from dit.training.batch import RandomStreams, draw_batch


def test_text_device_places_the_encoder_and_plan_leaves_it_out():
    assert text_device(TextConfig(), "cuda:1") == torch.device("cuda:1")
    assert text_device(TextConfig(device="cpu"), "cuda:1") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"text\.device: must be auto \(the training device\) or cpu, got 'gpu'"):
        TextConfig(device="gpu")
    frozen = {}
    for device in ("auto", "cpu"):
        cfg = load_config(None, [f"text.device={device}"])  # the packaged MiniLM
        frozen[device] = next(e for e in estimate(cfg, gpus=1, gpu_memory_gb=80, size=model_size(cfg))).frozen
    assert frozen["auto"] - frozen["cpu"] == 4 * MINILM[0]  # MiniLM's parameters in fp32


ON_CPU = not torch.cuda.is_available() and os.environ.get("DIT_GPU_TESTS_ON_CPU") == "1"


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")
def test_states_of_a_cpu_text_encoder_reach_the_cuda_model():
    device = torch.device("cpu" if ON_CPU else "cuda")
    vae = CausalVAE(latent_channels=4, base_channels=8).to(device)
    text = NoText().to(text_device(TextConfig(device="cpu"), device))
    batch = {"mean": torch.zeros(2, 4, 3, 4, 4), "logvar": torch.zeros(2, 4, 3, 4, 4), "caption": ["a", "b"]}
    latents, states, mask, t, noise = draw_batch(batch, vae, text, DiffusionConfig(), (1, 2, 2), RandomStreams(0),
                                                 device, keep=None)
    assert text._device_probe.device.type == "cpu"  # NoText's device (the GPU machine has no MiniLM)
    assert {x.device.type for x in (latents, states, mask, t, noise)} == {device.type}
    batch["text"], batch["text_mask"] = torch.ones(2, 1, text.dim), torch.ones(2, 1, dtype=torch.bool)  # stored
    _, states, mask, _, _ = draw_batch(batch, vae, text, DiffusionConfig(prompt_dropout=1.0), (1, 2, 2),
                                       RandomStreams(0), device, keep=None)  # every prompt dropped: ""'s states
    assert states.device.type == mask.device.type == device.type and torch.count_nonzero(states) == 0
