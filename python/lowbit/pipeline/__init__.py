"""oneshot and its calibration data / layer-sequential machinery."""

from .data import prepare_calibration
from .oneshot import oneshot

__all__ = ["oneshot", "prepare_calibration"]
