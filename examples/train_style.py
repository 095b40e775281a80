"""Train a style or subject LoRA: the same flags as ``lora-diffusion train`` (see ``--help``).

    python examples/train_style.py --pretrained_model_name_or_path ./sd15 --train_data_dir data/style \
        --output_dir out --token "<my-style>" --max_train_steps 500
    accelerate launch --num_processes 2 examples/train_style.py --config style.toml
"""

import sys

from lora_diffusion.training.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="train_style.py"))
