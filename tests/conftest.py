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


def save_peft_lora(ref, folder, unet_cfg, te_cfg):
    """``ref``'s PEFT adapters (UNet, text encoder; made with ``unet_cfg`` / ``te_cfg``) as diffusers writes them
    (``save_lora_weights``, with the configs as adapter metadata): the file's path."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )  # fmt: skip
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture
def pipe():
    return tiny_pipeline(0)
