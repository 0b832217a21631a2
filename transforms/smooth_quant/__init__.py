"""SmoothQuant: per-channel smoothing of linear inputs, folded into the weights."""

from .method import InputSmoothing, SmoothQuantState, smooth_quant, smoothing_scales

__all__ = ["InputSmoothing", "SmoothQuantState", "smooth_quant", "smoothing_scales"]
