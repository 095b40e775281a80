import os

import pytest
import torch

from lora_diffusion.formats_kohya import ldm_module_path, ldm_unet_prefixes
from lora_diffusion.inject import lora_parameters
from lora_diffusion.testing import tiny_pipeline


# The suite runs on pytest-xdist workers (pyproject: ``-n auto --dist loadfile``): the tiny models' ops leave a
# second core mostly idle, so two processes of one thread each do the work of one of two threads in ~half the time.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, _CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # the subprocesses a test starts, alike

# The files in this order (``--no-loadscope-reorder``), the longest first, so that no worker starts one when the
# others are nearly done. xdist hands a worker its next file when it has <= 2 tests left: the README demo (one
# test, ~4.5 minutes) takes a short file along at the start, and the other worker the longest of the rest.
_FIRST = ("test_demo.py", "test_training.py", "test_bundled_embeddings.py", "test_compile.py", "test_bench_smoke.py",
          "test_ui_app.py", "test_sequences.py", "test_ui_handlers.py", "test_examples.py")


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: the cores this process may run on (psutil's count, xdist's default, ignores the affinity a
    container sets), at most 4."""
    return max(1, min(4, _CORES))


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # (stable: each file keeps its order)


def compile_pipeline(seed: int = 0):
    """``tiny_pipeline`` with a smaller UNet that still has attention down, in the middle and up (one cross-attention
    block each way, one layer each), for the torch.compile tests: dynamo traces it in ~3 s a graph on one thread,
    the tiny UNet in ~6 s. The same ``seed`` always gives the same weights."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        pipe.unet = UNet2DConditionModel(block_out_channels=(32,), layers_per_block=1, sample_size=32, in_channels=4,
                                         out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
                                         up_block_types=("CrossAttnUpBlock2D",), norm_num_groups=32,
                                         cross_attention_dim=32).eval()
    return pipe


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


def base_params(pipe) -> dict[str, torch.Tensor]:
    """Every UNet and text-encoder parameter by its plain path (a LoRA wrapper's base layer as the layer)."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is None:
            continue
        for name, p in getattr(pipe, component).named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                continue
            out[f"{component}.{name.replace('.base_layer.', '.')}"] = p.detach().clone()
    return out


def move_weights(pipe, scale: float = 0.1, seed: int = 1):
    """``pipe`` with every UNet and text-encoder parameter moved in place by ``scale`` of its mean magnitude (random
    directions from ``seed``): model B for ``comfyui_extraction``. Returns ``pipe``."""
    g = torch.Generator().manual_seed(seed)
    models = [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    with torch.no_grad():
        for p in (p for model in models for p in model.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * (scale * p.abs().mean() + 1e-3))
    return pipe


def comfyui_extraction(a, b) -> dict[str, torch.Tensor]:
    """What ComfyUI's LoraSave writes for model ``b`` minus model ``a`` (its names; full-rank SVD factors, no clamp):
    a >= 2-D weight as lora_up / lora_down (a 1x1 conv's squeezed to 2-D, a 3x3 conv's down factor conv-shaped), a
    1-D weight as ``.diff``, a bias as ``.diff_b``."""
    unet = a.unet
    prefixes = ldm_unet_prefixes(2, len(unet.down_blocks), [hasattr(blk, "attentions") for blk in unet.up_blocks])
    pa, pb = base_params(a), base_params(b)
    state = {}
    for key, p0 in pa.items():
        component, _, path = key.partition(".")
        module, _, which = path.rpartition(".")
        encoder = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}.get(component)
        text = module if module.startswith("text_projection") else f"text_model.{module}"
        name = (f"diffusion_model.{ldm_module_path(module, prefixes)}" if component == "unet"
                else f"text_encoders.{encoder}.transformer.{text}")
        diff = (pb[key] - p0).double()
        if which == "bias":
            state[f"{name}.diff_b"] = diff.float()
        elif diff.dim() < 2:
            state[f"{name}.diff"] = diff.float()
        else:
            u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
            up, down = (u * s).float(), vh.float()
            if diff.dim() == 4 and diff.shape[2:] != (1, 1):
                up, down = up[:, :, None, None], down.reshape(-1, *diff.shape[1:])
            state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"] = up.contiguous(), down.contiguous()
    return state


@pytest.fixture
def pipe():
    return tiny_pipeline(0)
