"""Checkpoint formats: save from and load into lowbit modules."""

from .compressed_tensors import compressed_state_dict, load, quantization_config, save_compressed

__all__ = ["compressed_state_dict", "load", "quantization_config", "save_compressed"]
