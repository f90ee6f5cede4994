"""Model registry: ``build_model(ModelConfig)`` -> a U-Net-like segmentation network with a projector head.

A model knows no training recipe: it may import ``instances`` (output channels of a representation) and the
top-level utilities, never ``data``, ``methods``, ``training``, ``inference``, ``wsi`` or ``commands``."""

from cdcl.models.unet import SegmentationModel, build_model

__all__ = ["SegmentationModel", "build_model"]
