"""Checkpoint formats: save from and load into lowbit modules."""

from .checkpoint import compressed_state_dict, load, quantization_config, save_compressed

__all__ = ["compressed_state_dict", "load", "quantization_config", "save_compressed"]
