"""Model registry: ``build_model(ModelConfig)`` -> a U-Net-like segmentation network with a projector head."""

from cdcl.models.unet import SegmentationModel, build_model

__all__ = ["SegmentationModel", "build_model"]
