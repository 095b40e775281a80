"""Q3c: which file a tag names. A1111 resolves <lora:X> by file name (any subfolder of its LoRA folder) OR by the
file's alias, kohya's ss_output_name (networks.list_available_networks), and its card inserts the alias by default
(lora_preferred_name="Alias from file", NetworkOnDisk.get_alias). Checked: the alias our save_lora(format="kohya")
writes without metadata, and for three files (top level; in a subfolder; renamed, so that its alias is not its file
name) the tag by file name and the tag A1111's card inserts, in A1111 and in our apply_prompt_loras.

Pass: ss_output_name written without metadata is the file's own name (what kohya writes); every tag loads in both,
the same file.
Writes $OUT/q3_alias_results.json."""
import os
import shutil

import safetensors
import safetensors.torch

import a1111_harness as H
import models
from common import Verdicts, base_weights, dump
from lora_diffusion import delete_adapter, inject_lora, list_adapters, remove_lora, save_lora
from lora_diffusion.blend import _tag_path, apply_prompt_loras

V = Verdicts("q3_alias")
shutil.rmtree(H.LORA_DIR, ignore_errors=True)
os.makedirs(os.path.join(H.LORA_DIR, "sub"))
pipe = models.sd15_pipeline()
inject_lora(pipe.unet, rank=4)
style = save_lora(os.path.join(H.LORA_DIR, "style.safetensors"), unet=pipe.unet, format="kohya")  # no metadata name
deep = save_lora(os.path.join(H.LORA_DIR, "sub", "deep.safetensors"), unet=pipe.unet, format="kohya")
trained = save_lora(os.path.join(H.LORA_DIR, "trained.safetensors"), unet=pipe.unet, format="kohya")
remove_lora(pipe.unet)
renamed = os.path.join(H.LORA_DIR, "renamed by user.safetensors")  # a user renamed the file: alias stays "trained"
os.replace(trained, renamed)

with safetensors.safe_open(str(style), "pt") as f:
    alias_written = f.metadata().get("ss_output_name")
V.judge("ss_output_name", alias_written == "style", f"save_lora(format='kohya') without metadata wrote "
        f"ss_output_name={alias_written!r} for style.safetensors")

H.install_model(base_weights(pipe))
rows = []
for path in (style, deep, renamed):
    path = os.path.realpath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    entry = H.networks.available_networks[stem]
    for tag in dict.fromkeys((f"<lora:{stem}:1>", f"<lora:{entry.get_alias()}:1>")):  # file name; card's tag
        H.networks.loaded_networks.clear()
        _, loaded = H.activate_prompt("x " + tag)
        a_file = [os.path.realpath(n.network_on_disk.filename) for n in H.networks.loaded_networks]
        name = tag[len("<lora:"):-len(":1>")]
        try:
            o_file = [os.path.realpath(_tag_path(name, H.LORA_DIR, set()))]
            apply_prompt_loras(pipe, "x " + tag, H.LORA_DIR)
            ours = "loads"
        except Exception as e:  # noqa
            o_file, ours = [], f"{type(e).__name__}: {e}"
        for adapter in {n for names in list_adapters(pipe).values() for n in names}:
            delete_adapter(pipe, adapter)
        rel = lambda fs: [os.path.relpath(f, H.LORA_DIR) for f in fs]
        row = dict(file=os.path.relpath(path, H.LORA_DIR), alias=entry.alias, tag=tag, a1111=rel(a_file), ours=rel(o_file),
                   ours_status=ours)
        rows.append(row)
        V.judge("q3_alias", a_file == o_file == [path] and ours == "loads",
                f"{row['file']} (alias {entry.alias!r}) tag {tag}: A1111 loads {row['a1111']}, ours {row['ours']} ({ours})")
dump("q3_alias_results.json", dict(ss_output_name_without_metadata=alias_written, tags=rows))
V.finish()
