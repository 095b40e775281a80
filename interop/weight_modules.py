"""Shared by the checks of modules whose delta is made from the layer's weight (``oft/q_oft.py``,
``glora/q_glora.py``): the PASS / KNOWN / FAIL report, the checkouts named by environment variables, and the stubs
that let A1111's and ComfyUI's adapter files be imported unmodified without their runtimes."""
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]


class Report:
    """PASS / KNOWN / FAIL lines on ``max |got - want|`` relative to the delta's largest value (``want - base``);
    ``failed`` once any line failed."""

    def __init__(self, tol: float):
        self.tol, self.failed = tol, False

    def __call__(self, name: str, got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, known: str | None = None):
        scale = float((want.detach().double() - base.detach().double()).abs().max())
        err = float((got.detach().double() - want.detach().double()).abs().max()) / scale
        verdict = "PASS" if err < self.tol else "KNOWN" if known else "FAIL"
        self.failed |= verdict == "FAIL"
        print(f"{verdict} {name}: max diff {err:.2e} of the delta ({scale:.3g})"
              f"{'; ' + known if known and verdict == 'KNOWN' else ''}")


def ours(module: str):
    """``lora_diffusion/<module>.py`` loaded alone (it needs torch only), not the package."""
    spec = importlib.util.spec_from_file_location(f"ours_{module}", REPO / "lora_diffusion" / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def env_dir(name: str, inside: str) -> Path:
    path = Path(os.environ.get(name, ""))
    if not (path / inside).is_file():
        sys.exit(f"set {name} to a checkout holding {inside}")
    return path.resolve()


def stub(name: str, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def package(name: str, folder: Path) -> None:
    """A package ``name`` over ``folder``, so that its modules' relative imports resolve inside it."""
    stub(name).__path__ = [str(folder)]


def a1111_lora(a1111: Path):
    """A1111's ``extensions-builtin/Lora`` on the path with the webui runtime that ``network.py`` imports stubbed (the
    network modules use none of it); returns its ``network`` module."""
    stub("modules"), stub("modules.sd_models"), stub("modules.cache"), stub("modules.errors"), stub("modules.hashes")
    stub("modules.shared"), stub("modules.models"), stub("modules.models.sd3")
    stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (nn.Linear,), {}))
    sys.modules["modules"].models = sys.modules["modules.models"]
    sys.modules["modules.models"].sd3 = sys.modules["modules.models.sd3"]
    sys.modules["modules.models.sd3"].mmdit = sys.modules["modules.models.sd3.mmdit"]
    sys.path.insert(0, str(a1111 / "extensions-builtin" / "Lora"))
    import network

    return network


def a1111_weight(network, cls, w: dict, module: nn.Module, multiplier: float) -> torch.Tensor:
    """The weight A1111's network module ``cls`` gives ``module`` from the file's tensors ``w`` at ``multiplier``."""
    net = types.SimpleNamespace(te_multiplier=multiplier, unet_multiplier=multiplier)
    m = cls(net, network.NetworkWeights("lyco", "diffusion_model.x", w, module))
    updown, _ = m.calc_updown(module.weight.detach())
    return module.weight.detach() + updown


def comfy_weight_adapters(comfy: Path) -> str:
    """ComfyUI's ``comfy/weight_adapter`` importable as the package ``comfy_wa`` (its model management stubbed)."""
    stub("comfy.model_management", cast_to_device=lambda t, device, dtype, copy=False: t.to(device, dtype))
    sys.modules["comfy"] = stub("comfy", model_management=sys.modules["comfy.model_management"])
    package("comfy_wa", comfy / "comfy" / "weight_adapter")
    return "comfy_wa"
