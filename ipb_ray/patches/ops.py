"""The names of the strong (UDA/FixMatch) view's ops, torch-free, so the configuration can
check ``augment.strong_ops`` without importing the image code that implements them
(:func:`ipb_ray.patches.augment.strong_view`)."""

from __future__ import annotations

__all__ = ["GRAY_STRONG_OPS", "STRONG_OPS"]

#: RandAugment-style ops of :func:`ipb_ray.patches.augment.strong_view` for single-channel images.
STRONG_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "posterize", "contrast",
              "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
#: Default strong ops: the ones that keep a phase-contrast image's polarity and grey-level
#: order (solarize, posterize and equalize invert or flatten the halo and texture cues).
GRAY_STRONG_OPS = ("identity", "autocontrast", "rotate", "contrast", "brightness", "sharpness", "shear_x",
                   "shear_y", "translate_x", "translate_y")
