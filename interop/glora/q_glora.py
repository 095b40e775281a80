"""GLoRA and (IA)^3: the weight our loader gives a layer (``lora_diffusion.glora``: ``Glora.delta``, ``Ia3.delta``,
what ``load_lora`` keeps and ``fuse`` bakes) against the weight the trainer and the other tools' own code give it, on
the same base weight and the tensors the trainer writes to its file, fp32 on CPU:

  * LyCORIS 4.x (the current trainer; GLoRA's second layout, Tucker convs, (IA)^3): ``GLoRAModule`` / ``IA3Module``'s
    merged weight and forward, from the package in $LYCORIS_DIR (an unpacked lycoris-lora wheel; checked with 4.1.3);
  * LyCORIS 2.x (GLoRA's first layout, Linear and 1x1 convs): ``GLoRAModule``'s ``merge_to`` and forward, from the
    sdist in $LYCORIS2_DIR (checked with 2.2.0);
  * A1111's ``network_glora`` / ``network_ia3`` (``calc_updown`` + ``finalize_updown``), from $A1111_DIR;
  * ComfyUI's ``GLoRAAdapter.calculate_weight`` (both layouts), from $COMFYUI_DIR.

The tools' runtimes are stubbed; their GLoRA / (IA)^3 files are imported unmodified. One PASS / KNOWN / FAIL line per
comparison: PASS where the largest difference is under 1e-5 of the delta's largest value, KNOWN where a tool is known
to differ (the line says how).
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from weight_modules import Report, a1111_lora, a1111_weight, comfy_weight_adapters, env_dir, package  # noqa: E402
from weight_modules import ours as ours_module  # noqa: E402

ours = ours_module("glora")
report = Report(1e-5)

# ------------------------------------------------------------------ the tools' code
LYCORIS = env_dir("LYCORIS_DIR", "lycoris/modules/glora.py")
LYCORIS2 = env_dir("LYCORIS2_DIR", "lycoris/modules/glora.py")
A1111 = env_dir("A1111_DIR", "extensions-builtin/Lora/network_glora.py")
COMFY = env_dir("COMFYUI_DIR", "comfy/weight_adapter/glora.py")

sys.path.insert(0, str(LYCORIS))
from lycoris.modules.glora import GLoRAModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402

package("lyco2", LYCORIS2 / "lycoris" / "modules")  # (its glora.py imports .base only)
from lyco2.glora import GLoRAModule as GLoRAModule2  # noqa: E402

network = a1111_lora(A1111)
import network_glora  # noqa: E402
import network_ia3  # noqa: E402

comfy_weight_adapters(COMFY)
from comfy_wa.glora import GLoRAAdapter  # noqa: E402


def a1111_reports(name: str, cls, w: dict, module: nn.Module, mine: torch.Tensor, base: torch.Tensor, known: str | None):
    """A1111 at multipliers 1 and 0.7 against ours; KNOWN where A1111's own code raises on the module."""
    try:
        at1 = a1111_weight(network, cls, w, module, 1.0)
    except RuntimeError as e:  # (shapes A1111's matmul / reshape cannot take)
        print(f"KNOWN {name}: A1111: its code raises on this layer ({str(e).splitlines()[0][:90]})")
        return
    report(f"{name}: A1111 x1", mine, at1, base, known)
    report(f"{name}: A1111 x0.7", base + 0.7 * (mine - base), a1111_weight(network, cls, w, module, 0.7), base, known)


def comfy_weight(w: dict, weight: torch.Tensor, strength: float) -> torch.Tensor:
    loaded = GLoRAAdapter.load("x", {f"x.{k}": v for k, v in w.items() if k != "alpha"},
                               float(w["alpha"]) if "alpha" in w else None, None)
    return loaded.calculate_weight(weight.detach().clone(), "x", strength, 1.0, None, lambda a: a)


def randomize(module: nn.Module, names: list[str], std: float = 0.05) -> None:
    with torch.no_grad():
        for name in names:
            p = getattr(module, name).weight if name != "weight" else module.weight
            p.copy_(torch.randn_like(p) * std)


def forward_weight(lyco, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, the module's output through the trainer's forward, its base output)``, for comparing with ``W'``."""
    x = torch.randn(3, module.in_features) if isinstance(module, nn.Linear) else torch.randn(1, module.in_channels, 6, 6)
    with torch.no_grad():
        plain = module(x)
        lyco.apply_to()
        got = module(x)
        lyco.restore() if hasattr(lyco, "restore") else None
    return x, got, plain


def op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, weight, module.bias)
    return nn.functional.conv2d(x, weight, module.bias, module.stride, module.padding)


def lycoris_reports(name: str, lyco, module: nn.Module, mine: torch.Tensor, base: torch.Tensor) -> None:
    """A LyCORIS 4 module's merged weight at multipliers 1 and 0.7, and its forward, against ours."""
    with torch.no_grad():
        lyco_w = lyco.get_merged_weight(multiplier=1.0, shape=base.shape, device=base.device)[0]
        lyco07 = lyco.get_merged_weight(multiplier=0.7, shape=base.shape, device=base.device)[0]
    report(f"{name}: LyCORIS merged", mine, lyco_w, base)
    report(f"{name}: LyCORIS merged x0.7", base + 0.7 * (mine - base), lyco07, base)
    x, got, plain = forward_weight(lyco, module)
    report(f"{name}: LyCORIS forward", op(module, x, mine), got, plain)


# ------------------------------------------------------------------ GLoRA, LyCORIS 4 (the second layout)
torch.manual_seed(0)
for name, module, dim, alpha in [("Linear 768->320", nn.Linear(768, 320), 8, 4.0),
                                 ("Linear 320->320, alpha = rank", nn.Linear(320, 320), 8, 8.0),
                                 ("Conv 3x3 320->320", nn.Conv2d(320, 320, 3, padding=1), 8, 2.0),
                                 ("Conv 3x3 320->640", nn.Conv2d(320, 640, 3, padding=1), 8, 2.0),
                                 ("Conv 1x1 320->320", nn.Conv2d(320, 320, 1), 4, 1.0)]:
    lyco = GLoRAModule("lora_unet_x", module, 1.0, lora_dim=dim, alpha=alpha)
    randomize(lyco, ["a1", "a2", "b1", "b2"])
    w = {k: v.detach().clone() for k, v in lyco.custom_state_dict().items()}  # what the trainer writes
    base = module.weight.detach().clone()
    glora = ours.Glora(w["a1.weight"], w["a2.weight"], w["b1.weight"], w["b2.weight"], float(w["alpha"]))
    assert not glora.old_layout, name
    mine = base + glora.delta(base)
    lycoris_reports(f"GLoRA (LyCORIS 4) {name}", lyco, module, mine, base)
    report(f"GLoRA (LyCORIS 4) {name}: ComfyUI x1", mine, comfy_weight(w, base, 1.0), base)
    report(f"GLoRA (LyCORIS 4) {name}: ComfyUI x0.7", base + 0.7 * (mine - base), comfy_weight(w, base, 0.7), base)

# ------------------------------------------------------------------ GLoRA, LyCORIS 2 (the first layout)
for name, module, dim, alpha in [("Linear 768->320", nn.Linear(768, 320), 8, 4.0),
                                 ("Linear 320->320, alpha = rank", nn.Linear(320, 320), 8, 8.0),
                                 ("Conv 1x1 320->320", nn.Conv2d(320, 320, 1), 4, 1.0),
                                 ("Conv 1x1 320->320, alpha = rank", nn.Conv2d(320, 320, 1), 4, 4.0)]:
    lyco = GLoRAModule2("lora_unet_x", module, 1.0, lora_dim=dim, alpha=alpha)
    randomize(lyco, ["a1", "a2", "b1", "b2"])
    w = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    base = module.weight.detach().clone()
    glora = ours.Glora(w["a1.weight"], w["a2.weight"], w["b1.weight"], w["b2.weight"], float(w["alpha"]))
    assert glora.old_layout, name
    mine = base + glora.delta(base)
    with torch.no_grad():
        lyco_w = base + (lyco.make_weight() * lyco.scale).reshape(base.shape)  # merge_to's weight
    report(f"GLoRA (LyCORIS 2) {name}: LyCORIS merge_to", mine, lyco_w, base)
    x, got, plain = forward_weight(lyco, module)
    scaled = dim != alpha
    report(f"GLoRA (LyCORIS 2) {name}: LyCORIS forward", op(module, x, mine), got, plain,
           "LyCORIS 2's forward applies alpha / r twice (a1 x scale, then a2 x scale); its merge_to once" if scaled else None)
    report(f"GLoRA (LyCORIS 2) {name}: ComfyUI x1", mine, comfy_weight(w, base, 1.0), base)
    report(f"GLoRA (LyCORIS 2) {name}: ComfyUI x0.7", base + 0.7 * (mine - base), comfy_weight(w, base, 0.7), base)
    a1111_reports(f"GLoRA (LyCORIS 2) {name}", network_glora.NetworkModuleGLora, w, module, mine, base,
                  "A1111 applies no alpha to GLoRA (its scale is 1)" if scaled else None)

# ------------------------------------------------------------------ (IA)^3, LyCORIS 4
for name, module, on_input in [("Linear 768->320, output rows", nn.Linear(768, 320), False),
                               ("Linear 768->320, input columns", nn.Linear(768, 320), True),
                               ("Conv 3x3 320->640, output channels", nn.Conv2d(320, 640, 3, padding=1), False),
                               ("Conv 3x3 320->640, input channels", nn.Conv2d(320, 640, 3, padding=1), True)]:
    lyco = IA3Module("lora_unet_x", module, 1.0, train_on_input=on_input)
    randomize(lyco, ["weight"], 0.3)
    w = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    base = module.weight.detach().clone()
    ia3 = ours.Ia3(w["weight"], bool(w["on_input"]))
    mine = base + ia3.delta(base)
    lycoris_reports(f"(IA)^3 {name}", lyco, module, mine, base)
    a1111_reports(f"(IA)^3 {name}", network_ia3.NetworkModuleIa3, w, module, mine, base,
                  "A1111 broadcasts a conv's (IA)^3 weight against the kernel axes" if not isinstance(module, nn.Linear) else None)

sys.exit(1 if report.failed else 0)
