"""Import kohya-ss/sd-scripts' networks/lora.py and its UNets without its training stack, from the checkout named
by $SD_SCRIPTS_DIR (never copied into this repo; needs einops, and accelerate for library/device_utils).

Nothing under $SD_SCRIPTS_DIR is edited. What is stubbed (sys.modules, before import):
  * torchvision, torchvision.transforms, cv2: imported at module level by library/utils.py (image helpers only,
    never called by networks/lora.py or the UNets);
  * library.train_util: imported lazily by LoRANetwork.save_weights only for
    precalculate_safetensors_hashes; the stub reproduces that function (train_util.py l.3259-3300) so the
    sshs_* hashes are written as kohya writes them. The real train_util needs accelerate/toml/imagesize/cv2/
    torchvision and the whole dataset stack.
"""

import hashlib
import os
import sys
import types
from io import BytesIO
from pathlib import Path

SD_SCRIPTS = Path(os.environ.get("SD_SCRIPTS_DIR", ""))
if not (SD_SCRIPTS / "networks" / "lora.py").is_file():
    sys.exit(f"SD_SCRIPTS_DIR must name a kohya-ss/sd-scripts checkout (holding networks/lora.py); got {str(SD_SCRIPTS)!r}")
sys.path.insert(0, str(SD_SCRIPTS.resolve()))


import diffusers  # noqa: E402,F401  (import first: diffusers probes torchvision's availability at import)
import transformers  # noqa: E402,F401
import importlib.machinery  # noqa: E402


def _stub(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


if "torchvision" not in sys.modules:
    tv = _stub("torchvision")
    tv.transforms = _stub("torchvision.transforms")
if "cv2" not in sys.modules:
    _stub("cv2")


def _precalculate_safetensors_hashes(tensors, metadata):
    import safetensors.torch

    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1 << 20), b""):
        h.update(chunk)
    legacy = hashlib.sha256()
    b.seek(0x100000)
    legacy.update(b.read(0x10000))
    return h.hexdigest(), legacy.hexdigest()[0:8]


import library  # noqa: E402  (the real package, for its __path__)

library.train_util = _stub("library.train_util", precalculate_safetensors_hashes=_precalculate_safetensors_hashes)

from library import original_unet, sdxl_original_unet  # noqa: E402,F401  (used as K.original_unet, ...)
from networks import lora as kohya_lora  # noqa: E402

# kohya mutates the class attribute (networks/lora.py: `target_modules = UNET_TARGET_REPLACE_MODULE;
# target_modules += ...`), so after any network with conv_dim or from weights every later network also walks
# ResNets. Keep a pristine copy so scripts can reset it between networks.
_UNET_TARGETS = ["Transformer2DModel"]


def reset_targets():
    kohya_lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(_UNET_TARGETS)


def unapply(model):
    """Undo LoRAModule.apply_to on a model (it sets an instance attribute ``forward``)."""
    for m in model.modules():
        if "forward" in m.__dict__:
            del m.__dict__["forward"]


def base_models():
    """kohya's SD1.5 UNet and the CLIP-L, with the base weights make_base.py saved in OUT (the UNet built on the meta
    device, then given the saved tensors: one copy of its 3.4 GB in memory, not two)."""
    import torch
    from safetensors.torch import load_file

    from common import WORK, clip_l, load_te_state

    with torch.device("meta"):
        unet = original_unet.UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768)
    unet.load_state_dict(load_file(WORK / "base_unet.safetensors"), assign=True)
    unet.eval()
    te = clip_l()
    load_te_state(te, load_file(WORK / "base_te.safetensors"))
    return unet, te
