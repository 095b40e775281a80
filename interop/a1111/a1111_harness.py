"""Harness, no check of its own: runs AUTOMATIC1111's own Lora extension code (checked at v1.10.1, 82a973c; imported
from $A1111_DIR, never copied here) on CPU with stubs for the webui runtime (modules.shared, devices, sd_models,
sd_hijack, ...), against a module tree in LDM/SGM layout built from an original-layout checkpoint state dict
(lora_diffusion.tools.to_ldm_checkpoint).

Only the runtime is stubbed; networks.py, network.py, network_lora.py, lyco_helpers.py, extra_networks_lora.py and
modules/extra_networks.py are A1111's unmodified files. LoRA files under test live in $OUT/loras (A1111's lora_dir)."""
import ast
import logging
import os
import sys
import tempfile
import types
from types import SimpleNamespace

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

WEBUI = os.environ.get("A1111_DIR")
if not WEBUI or not os.path.isfile(os.path.join(WEBUI, "modules", "extra_networks.py")):
    sys.exit("set A1111_DIR to an AUTOMATIC1111/stable-diffusion-webui checkout (see README.md)")
WEBUI = os.path.abspath(WEBUI)
LORA_EXT = f"{WEBUI}/extensions-builtin/Lora"
# every file the checks write goes to $OUT (run_all.sh sets it), never into the repo
OUT = os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "lora_diffusion_interop", "a1111")
os.makedirs(OUT, exist_ok=True)


def _mod(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    parent, _, leaf = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], leaf, m)
    return m


def _walk_files(path, allowed_extensions=None):
    if not os.path.exists(path):
        return
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if allowed_extensions is None or os.path.splitext(f)[1].lower() in allowed_extensions:
                yield os.path.join(root, f)


def _read_metadata(filename):
    with safetensors.safe_open(filename, "pt") as f:
        return dict(f.metadata() or {})


class _EmbDB:
    word_embeddings = {}
    expected_shape = -1
    skipped_embeddings = {}

    def register_embedding(self, *a):
        raise NotImplementedError("bundled embeddings not exercised here")

    register_embedding_by_name = register_embedding


LORA_DIR = os.path.join(OUT, "loras")  # A1111's --lora-dir: the files under test
os.makedirs(LORA_DIR, exist_ok=True)

sys.path[:0] = [WEBUI, LORA_EXT]
import modules  # noqa: E402,F401  (the real package; selected submodules are stubbed below)

_mod("gradio", Warning=lambda *a, **k: None)
_mod("einops", rearrange=None)  # used only by network_oft (OFT), not exercised
shared = _mod("modules.shared",
              opts=SimpleNamespace(lora_functional=False, lora_in_memory_limit=0, lora_not_found_warning_console=True,
                                   lora_not_found_gradio_warning=False, sd_lora="None", lora_add_hashes_to_infotext=False,
                                   lora_preferred_name="Alias from file", lora_bundled_ti_to_infotext=False,
                                   extra_networks_default_multiplier=1.0),
              cmd_opts=SimpleNamespace(lora_dir=LORA_DIR, lyco_dir_backcompat=LORA_DIR + "_lyco_none"),
              sd_model=None, walk_files=_walk_files)
devices = _mod("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32,
               torch_gc=lambda: None, cond_cast_unet=lambda x: x)
_mod("modules.sd_models", read_state_dict=lambda fn, **k: safetensors.torch.load_file(fn),
     read_metadata_from_safetensors=_read_metadata)
_mod("modules.scripts")
_mod("modules.sd_hijack", model_hijack=SimpleNamespace(embedding_db=_EmbDB(), comments=[]))
_mod("modules.cache", cached_data_for_file=lambda sub, title, fn, func: func())
_mod("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: "0" * 64)
_mod("modules.textual_inversion")
_mod("modules.textual_inversion.textual_inversion", create_embedding_from_data=None)
_mod("modules.models")
_mod("modules.models.sd3")
_mod("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (nn.Linear,), {}))

import modules.extra_networks as extra_networks  # noqa: E402  (A1111's real parser)
import network  # noqa: E402
import networks  # noqa: E402
import extra_networks_lora  # noqa: E402

extra_network_lora = extra_networks_lora.ExtraNetworkLora()
networks.extra_network_lora = extra_network_lora
extra_networks.initialize()
extra_networks.register_extra_network(extra_network_lora)
extra_networks.register_extra_network_alias(extra_network_lora, "lyco")  # as scripts/lora_script.py does

# capture "didn't match keys" (logging.debug in load_network) and apply errors
_records = []


class _Grab(logging.Handler):
    def emit(self, record):
        _records.append(record.getMessage())


logging.getLogger().addHandler(_Grab())
logging.getLogger().setLevel(logging.DEBUG)


# ------------------------------------------------------------------------------------------------ LDM module tree
_GROUPNORM_LEAVES = ("in_layers.0", "out_layers.0", "out.0")


def _get_or_make(root, path):
    m = root
    for part in path.split(".") if path else []:
        if part not in m._modules:
            m.add_module(part, nn.Module())
        m = m._modules[part]
    return m


def build_tree(state, prefix):
    """An nn.Module tree whose named_modules() are the module paths of ``state`` keys under ``prefix`` (LDM/SGM
    layout), with leaf types A1111 dispatches on: Linear (2-D weight), Conv2d (4-D), LayerNorm/GroupNorm (1-D),
    nn.MultiheadAttention where open_clip packs q/k/v (``attn.in_proj_weight``)."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    root = nn.Module()
    mods = {}
    for key in sub:
        module, _, leaf = key.rpartition(".")
        mods.setdefault(module, set()).add(leaf)
    # MHA first (its out_proj child must live inside it)
    for module, leaves in sorted(mods.items()):
        if "in_proj_weight" in leaves:
            w = sub[f"{module}.in_proj_weight"]
            e = w.shape[1]
            parent, _, name = module.rpartition(".")
            mha = nn.MultiheadAttention(e, 1, batch_first=True)
            with torch.no_grad():
                mha.in_proj_weight.copy_(w)
                mha.in_proj_bias.copy_(sub[f"{module}.in_proj_bias"])
                mha.out_proj.weight.copy_(sub[f"{module}.out_proj.weight"])
                mha.out_proj.bias.copy_(sub[f"{module}.out_proj.bias"])
            mha.requires_grad_(False)
            _get_or_make(root, parent).add_module(name, mha)
    for module, leaves in sorted(mods.items()):
        if "in_proj_weight" in leaves or module.endswith("attn.out_proj") and f"{module[:-9]}.in_proj_weight" in sub:
            continue
        if "weight" not in leaves:  # bare parameters (positional_embedding, text_projection...)
            parent = _get_or_make(root, module)
            for leaf in leaves:
                parent.register_parameter(leaf, nn.Parameter(sub[f"{module}.{leaf}" if module else leaf].clone(), requires_grad=False))
            continue
        w = sub[f"{module}.weight"]
        bias = f"{module}.bias" in sub
        if w.dim() == 2:
            m = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        elif w.dim() == 4:
            k = w.shape[2]
            stride = 2 if module.endswith(".op") else 1
            m = nn.Conv2d(w.shape[1], w.shape[0], k, stride=stride, padding=k // 2, bias=bias)
        elif w.dim() == 1:
            gn = module.endswith(_GROUPNORM_LEAVES) or module.rsplit(".", 1)[-1] == "norm"
            m = nn.GroupNorm(1, w.shape[0]) if gn else nn.LayerNorm(w.shape[0])
        else:
            raise ValueError(module)
        with torch.no_grad():
            m.weight.copy_(w)
            if bias:
                m.bias.copy_(sub[f"{module}.bias"])
        for p in m.parameters():
            p.requires_grad_(False)
        parent, _, name = module.rpartition(".")
        _get_or_make(root, parent).add_module(name, m)
    return root


class FakeSDModel:
    """What A1111's networks.py reads of shared.sd_model: is_sdxl, cond_stage_model.wrapped / conditioner.embedders[i]
    .wrapped, and model (the DiffusionWrapper, whose named_modules start with diffusion_model.)."""

    def __init__(self, ldm_state):
        self.is_sdxl = any(k.startswith("conditioner.embedders.") for k in ldm_state)
        self.model = build_tree(ldm_state, "model.")
        if self.is_sdxl:
            self.conditioner = SimpleNamespace(embedders=[
                SimpleNamespace(wrapped=build_tree(ldm_state, f"conditioner.embedders.{i}.")) for i in (0, 1)])
        else:
            self.cond_stage_model = SimpleNamespace(wrapped=build_tree(ldm_state, "cond_stage_model."))

    def roots(self):
        if self.is_sdxl:
            return [(f"{i}_", e.wrapped) for i, e in enumerate(self.conditioner.embedders)] + [("", self.model)]
        return [("", self.cond_stage_model.wrapped), ("", self.model)]


def install_model(ldm_state):
    sd_model = FakeSDModel(ldm_state)
    shared.sd_model = sd_model
    networks.assign_network_names_to_compvis_modules(sd_model)
    networks.networks_in_memory.clear()
    networks.loaded_networks.clear()
    networks.list_available_networks()
    return sd_model


def load_file(path):
    """A1111's load_network on one file: (Network, {file key: compvis key it failed to match})."""
    _records.clear()
    name = os.path.splitext(os.path.basename(path))[0]
    net = networks.load_network(name, network.NetworkOnDisk(name, path))
    failed = {}
    for msg in _records:
        if "didn't match keys:" in msg:
            failed = ast.literal_eval(msg.split("didn't match keys: ", 1)[1])
    return net, failed


def _runtime_modules(sd_model):
    """The modules whose forward A1111 patches (lora_patches.py) and that run in a forward pass: Linear, Conv2d,
    GroupNorm, LayerNorm, MultiheadAttention; an MHA's out_proj is not called as a module (F.multi_head_attention_forward
    reads its weight), so its own forward (and network_apply_weights) never runs."""
    for _, root in sd_model.roots():
        skip = set()
        for name, m in root.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                skip.add(id(m.out_proj))
        for name, m in root.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)) and id(m) not in skip:
                yield m


def apply_all(sd_model):
    """network_apply_weights on every runtime module (what the first forward pass does); returns the errors dict."""
    extra_network_lora.errors.clear()
    _records.clear()
    with torch.no_grad():  # A1111 generates under no_grad
        for m in _runtime_modules(sd_model):
            networks.network_apply_weights(m)
    return dict(extra_network_lora.errors), [r for r in _records if r.startswith("Network ")]


def restore_all(sd_model):
    networks.loaded_networks.clear()
    with torch.no_grad():
        for m in _runtime_modules(sd_model):
            networks.network_apply_weights(m)  # wanted () -> restores backups


def activate_prompt(prompt):
    """A1111's path from prompt text to loaded networks with multipliers: extra_networks.parse_prompt, then
    ExtraNetworkLora.activate (-> networks.load_networks). Returns (stripped prompt, [(name, te, unet, dyn)])."""
    text, data = extra_networks.parse_prompt(prompt)
    p = SimpleNamespace(all_prompts=[text], extra_generation_params={}, scripts=None, iteration=0, prompts=[text],
                        seeds=[0], subseeds=[0], comment=lambda s: None)
    extra_networks.activate(p, data)
    return text, [(n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in networks.loaded_networks]


def ldm_weights(sd_model):
    """Current weights keyed as in the original-layout checkpoint (MHA: in_proj_weight and out_proj.weight)."""
    out = {}
    if sd_model.is_sdxl:
        roots = [(f"conditioner.embedders.{i}.", e.wrapped) for i, e in enumerate(sd_model.conditioner.embedders)]
    else:
        roots = [("cond_stage_model.", sd_model.cond_stage_model.wrapped)]
    roots.append(("model.", sd_model.model))
    for prefix, root in roots:
        for k, v in root.state_dict().items():
            out[prefix + k] = v
    return out
