import pytest
import torch

from lora_diffusion.inject import lora_parameters
from lora_diffusion.testing import tiny_pipeline


def randomize_lora(model, adapter=None, std=0.3, seed=0):
    """Give LoRA factors non-trivial values (B = 0 at init would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def generate(pipe, prompt="a red circle", seed=0, steps=2):
    out = pipe(prompt, num_inference_steps=steps, height=32, width=32, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images


@pytest.fixture
def pipe():
    return tiny_pipeline(0)
