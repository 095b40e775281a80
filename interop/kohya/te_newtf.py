"""Text-encoder names under transformers >= 5.6 (flattened CLIPTextModel), key level, tiny CLIP.
Run with the new-transformers interpreter (it needs einops for sd-scripts' import).
kohya pins transformers==4.54.1 (requirements.txt), so real kohya files say lora_te_text_model_encoder_...;
this checks what kohya would write/read if run on the flattened model, and how our loader/writer behave there.
Pass: our load_lora(strict=True) takes kohya's file (te and unet layers wrapped); kohya's unexpected keys on our
file are printed (today: 0 unexpected unet keys, missing 0)."""
import tempfile

import torch
import transformers

import kohya_shim as K
from lora_diffusion import inject_lora, load_lora, save_lora
from lora_diffusion.inject import lora_layers
from lora_diffusion.testing import tiny_pipeline

print("transformers", transformers.__version__)
pipe = tiny_pipeline()
te = pipe.text_encoder
print("classes:", sorted({type(m).__name__ for m in te.modules() if "Attention" in type(m).__name__ or "MLP" in type(m).__name__}))
K.reset_targets()
net = K.kohya_lora.create_network(1.0, 4, 1.0, None, te, pipe.unet)
names = [l.lora_name for l in net.text_encoder_loras]
print(f"kohya te modules on this transformers: {len(names)}, e.g. {names[0]}")
with torch.no_grad():
    for l in net.text_encoder_loras + net.unet_loras:
        torch.nn.init.normal_(l.lora_up.weight, std=0.05)
net.apply_to(te, pipe.unet)
d = tempfile.mkdtemp()
net.save_weights(f"{d}/k.safetensors", torch.float16, None)
K.unapply(te), K.unapply(pipe.unet)
del net
name = load_lora(pipe, f"{d}/k.safetensors", strict=True)
print("our load_lora of that file (strict=True): te layers wrapped",
      sum(name in l.specs for _, l in lora_layers(te)), "unet", sum(name in l.specs for _, l in lora_layers(pipe.unet)))

# our file (text_model_ names) into kohya running on this transformers
pipe = tiny_pipeline()
inject_lora(pipe.unet, rank=4), inject_lora(pipe.text_encoder, rank=4)
save_lora(f"{d}/o.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, format="kohya")
pipe = tiny_pipeline()  # fresh, unwrapped modules for kohya
K.reset_targets()
net, wsd = K.kohya_lora.create_network_from_weights(1.0, f"{d}/o.safetensors", None, pipe.text_encoder, pipe.unet)
net.apply_to(pipe.text_encoder, pipe.unet)
info = net.load_state_dict(wsd, False)
print(f"kohya (on transformers {transformers.__version__}) loading our file: te modules built {len(net.text_encoder_loras)}, "
      f"unexpected keys {len(info.unexpected_keys)}, e.g. {info.unexpected_keys[:1]}")
print("  built unet modules:", len(net.unet_loras), "file modules:", len({k.split('.')[0] for k in wsd}),
      "unexpected unet keys:", sum(k.startswith("lora_unet") for k in info.unexpected_keys), "missing", len(info.missing_keys))
