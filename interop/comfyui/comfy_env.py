"""Import ComfyUI's real code on CPU, from the checkout named by $COMFYUI_DIR (never copied into this repo).

torchvision / torchaudio / av are not installed here (a pinned torchvision would risk pulling
another torch); they are only imported by unrelated model families (cosmos, audio, video), so
they are replaced by inert stub modules. Nothing from ComfyUI's LoRA path uses them.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import types

COMFY = os.environ.get("COMFYUI_DIR")
if not COMFY or not os.path.isfile(os.path.join(COMFY, "comfy", "lora.py")):
    sys.exit(f"COMFYUI_DIR must name a ComfyUI checkout (holding comfy/lora.py); got {COMFY!r}")
COMFY = os.path.abspath(COMFY)
STUB_ROOTS = {"torchvision", "torchaudio", "av"}


class _Dummy:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return _Dummy()
    def __getattr__(self, n): return _Dummy()
    def __mro_entries__(self, bases): return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, n):
        if n.startswith("__"):
            raise AttributeError(n)
        return _Dummy()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUB_ROOTS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None
    def create_module(self, spec):
        m = _StubModule(spec.name); m.__path__ = []; return m
    def exec_module(self, module):
        pass


_done = None


def setup():
    global _done
    if _done is not None:
        return _done
    # resolve diffusers/transformers lazy imports first: they probe for torchvision and cache the answer
    import diffusers, transformers  # noqa
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa
    import lora_diffusion  # noqa
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    sys.meta_path.insert(0, _StubFinder())
    argv = sys.argv
    sys.argv = ["comfy", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # parses --cpu
    sys.argv = argv
    import comfy.model_management, comfy.lora, comfy.sd, comfy.model_base, comfy.supported_models  # noqa
    import comfy.model_patcher, comfy.sd1_clip, comfy.sdxl_clip, comfy.model_detection  # noqa
    import comfy_extras.nodes_lora_extract  # noqa
    # take the stubs away again, so that diffusers/transformers see torchvision as absent (as it is)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _StubFinder)]
    for name in [n for n in sys.modules if n.split(".")[0] in STUB_ROOTS]:
        del sys.modules[name]
    _done = comfy
    return comfy

