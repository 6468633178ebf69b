"""oneshot and its calibration data / layer-sequential machinery."""

from .data import prepare_calibration
from .imatrix import imatrix
from .oneshot import dispatch_for_generation, oneshot
from .sensitivity import sensitivity

__all__ = ["dispatch_for_generation", "imatrix", "oneshot", "prepare_calibration", "sensitivity"]
