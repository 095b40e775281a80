"""OFT / BOFT: the weight our loader gives a layer (``lora_diffusion.oft.oft_delta``, what ``load_lora`` keeps and
``fuse`` bakes) against the weight the trainers and the other tools' own code give it, on the same base weight and
blocks, fp32 on CPU:

  * LyCORIS (the trainer of diag-oft / BOFT files): ``DiagOFTModule`` / ``ButterflyOFTModule``'s merged weight, from
    the package in $LYCORIS_DIR (an unpacked lycoris-lora wheel; checked with 4.1.3);
  * kohya sd-scripts' ``networks/oft.py`` (``OFTModule.forward``, its own einsum), from $SD_SCRIPTS_DIR;
  * A1111's ``network_oft.NetworkModuleOFT.calc_updown`` (+ ``finalize_updown``), from $A1111_DIR, multipliers 1 and 0.7;
  * ComfyUI's ``OFTAdapter`` / ``BOFTAdapter.calculate_weight``, from $COMFYUI_DIR, strengths 1 and 0.7.

Only the tools' runtimes are stubbed (A1111's ``modules.*``, kohya's ``library.utils``, the diffusers / transformers
names kohya's oft.py imports and never uses here); their OFT files are imported unmodified. Prints one PASS / KNOWN /
FAIL line per comparison: PASS where the largest difference is under 1e-4 of the delta's largest value (fp32
Cayley transforms and inverses on both sides), KNOWN where a tool is known to differ (the line says how).
"""
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from weight_modules import Report, a1111_lora, a1111_weight, comfy_weight_adapters, env_dir, stub  # noqa: E402
from weight_modules import ours as ours_module  # noqa: E402

ours = ours_module("oft")
report = Report(1e-4)

# ------------------------------------------------------------------ the tools' code
LYCORIS = env_dir("LYCORIS_DIR", "lycoris/modules/diag_oft.py")
SD_SCRIPTS = env_dir("SD_SCRIPTS_DIR", "networks/oft.py")
A1111 = env_dir("A1111_DIR", "extensions-builtin/Lora/network_oft.py")
COMFY = env_dir("COMFYUI_DIR", "comfy/weight_adapter/oft.py")

sys.path.insert(0, str(LYCORIS))
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402

# kohya's oft.py: its imports that this check never reaches
stub("library"), stub("library.utils", setup_logging=lambda *a, **k: None)
if "diffusers" not in sys.modules:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        stub("diffusers", AutoencoderKL=object)
try:
    import transformers  # noqa: F401
except ImportError:
    stub("transformers", CLIPTextModel=object)
spec = importlib.util.spec_from_file_location("kohya_oft", SD_SCRIPTS / "networks" / "oft.py")
kohya_oft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kohya_oft)

network = a1111_lora(A1111)
import network_oft  # noqa: E402

comfy_weight_adapters(COMFY)
from comfy_wa.boft import BOFTAdapter  # noqa: E402
from comfy_wa.oft import OFTAdapter  # noqa: E402


def comfy_weight(adapter, key: str, w: dict, weight: torch.Tensor, strength: float) -> torch.Tensor:
    loaded = adapter.load(key, {f"{key}.{k}": v for k, v in w.items() if k != "alpha"},
                          float(w["alpha"]) if "alpha" in w else 0.0, None)
    return loaded.calculate_weight(weight.detach().clone(), key, strength, 1.0, None, lambda a: a)


# ------------------------------------------------------------------ cases
torch.manual_seed(0)
cases = [  # (name, module, lycoris dim, constraint, rescaled, kind)
    ("diag-oft Linear 768->320", nn.Linear(768, 320), 16, 0.0, False, "oft"),
    ("diag-oft Linear, constraint binding", nn.Linear(768, 320), 16, 2e-4, False, "oft"),
    ("diag-oft Linear, rescaled", nn.Linear(768, 320), 16, 0.0, True, "oft"),
    ("diag-oft Conv 3x3 320->320", nn.Conv2d(320, 320, 3, padding=1), 16, 0.0, False, "oft"),
    ("BOFT Linear 768->320", nn.Linear(768, 320), 10, 0.0, False, "boft"),
    ("BOFT Linear 768->320, constraint binding", nn.Linear(768, 320), 10, 2e-4, False, "boft"),
    ("BOFT Conv 3x3 320->320, rescaled", nn.Conv2d(320, 320, 3, padding=1), 10, 0.0, True, "boft"),
]
for name, module, dim, constraint, rescaled, kind in cases:
    cls = DiagOFTModule if kind == "oft" else ButterflyOFTModule
    lyco = cls("lora_unet_x", module, 1.0, lora_dim=dim, constraint=constraint, rescaled=rescaled)
    with torch.no_grad():
        lyco.oft_blocks.copy_(torch.randn_like(lyco.oft_blocks) * 0.05)
        if rescaled:
            lyco.rescale.copy_(1 + 0.1 * torch.randn_like(lyco.rescale))
    blocks = lyco.oft_blocks.detach().clone()
    rescale = lyco.rescale.detach().clone() if rescaled else None
    if constraint:
        q = blocks - blocks.transpose(-1, -2)
        assert float(q.norm()) > constraint * module.weight.shape[0], "the constraint should bind"
    w = {"oft_blocks": blocks, "alpha": torch.tensor(constraint)}
    if rescale is not None:
        w["rescale"] = rescale
    base = module.weight.detach().clone()
    mine = base + ours.oft_delta(ours.Oft(blocks, False, constraint, rescale), base)
    with torch.no_grad():
        lyco_w = lyco.get_merged_weight(multiplier=1.0, shape=base.shape, device=base.device)[0]
    report(f"{name}: LyCORIS", mine, lyco_w, base)
    mine07 = base + 0.7 * (mine - base)
    with torch.no_grad():
        lyco07 = lyco.get_merged_weight(multiplier=0.7, shape=base.shape, device=base.device)[0]
    report(f"{name}: LyCORIS x0.7", mine07, lyco07, base,
           "LyCORIS folds the multiplier into every butterfly stage" if kind == "boft" else
           "LyCORIS scales the rotation by the multiplier, not rescale" if rescaled else None)
    report(f"{name}: A1111 x1", mine, a1111_weight(network, network_oft.NetworkModuleOFT, w, module, 1.0), base)
    report(f"{name}: A1111 x0.7", mine07, a1111_weight(network, network_oft.NetworkModuleOFT, w, module, 0.7), base)
    adapter = OFTAdapter if kind == "oft" else BOFTAdapter
    known = None
    if rescale is not None and kind == "oft":
        known = "ComfyUI's OFT ignores rescale"
    if constraint:
        known = "ComfyUI bounds ||Q|| by alpha, not alpha * rows as LyCORIS, kohya and A1111"
    report(f"{name}: ComfyUI x1", mine, comfy_weight(adapter, "x", w, base, 1.0), base, known)
    known07 = ("ComfyUI applies the strength twice (strength * (strength * R - strength * I) W)" if kind == "oft" else
               "ComfyUI folds the strength into every butterfly stage, then scales the delta by it again")
    report(f"{name}: ComfyUI x0.7", mine07, comfy_weight(adapter, "x", w, base, 0.7), base, known or known07)

# kohya's networks.oft: OFTModule's own forward (its einsum on W) against F.linear / conv2d on our W'
for name, module, blocks_n, alpha in [("kohya OFT Linear 768->320", nn.Linear(768, 320), 20, 1.0),
                                      ("kohya OFT Linear, constraint binding", nn.Linear(768, 320), 20, 2e-4),
                                      ("kohya OFT Conv 3x3 320->320", nn.Conv2d(320, 320, 3, padding=1), 20, 1.0)]:
    k = kohya_oft.OFTModule("oft_unet_x", module, 1.0, blocks_n, alpha)
    with torch.no_grad():
        k.oft_blocks.copy_(torch.randn_like(k.oft_blocks) * 0.05)
    k.apply_to()
    x = torch.randn(2, 768) if isinstance(module, nn.Linear) else torch.randn(1, 320, 8, 8)
    base = module.weight.detach().clone()
    mine = base + ours.oft_delta(ours.Oft(k.oft_blocks.detach(), False, alpha, None, kohya=True), base)
    with torch.no_grad():
        got = k.forward(x)
        want = (nn.functional.linear(x, mine, module.bias) if isinstance(module, nn.Linear)
                else nn.functional.conv2d(x, mine, module.bias, padding=1))
        plain = (nn.functional.linear(x, base, module.bias) if isinstance(module, nn.Linear)
                 else nn.functional.conv2d(x, base, module.bias, padding=1))
    report(f"{name}: kohya's forward", want, got, plain)

sys.exit(1 if report.failed else 0)
