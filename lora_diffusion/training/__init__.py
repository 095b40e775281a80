"""LoRA training for Stable Diffusion (style and DreamBooth subject), on accelerate.

Example:
    >>> from lora_diffusion.training import TrainConfig, train
    >>> result = train(TrainConfig(pretrained_model_name_or_path="path/to/sd15", train_data_dir="data/style",
    ...                            output_dir="out", token="<my-style>", max_train_steps=500))
    >>> result.lora_path
    PosixPath('out/pytorch_lora_weights.safetensors')
"""

from .config import ConfigError, TrainConfig, load_config
from .data import DataError
from .loop import TrainResult, compile_unet, read_init_lora, train

__all__ = ["TrainConfig", "load_config", "train", "TrainResult", "ConfigError", "DataError", "compile_unet", "read_init_lora"]
