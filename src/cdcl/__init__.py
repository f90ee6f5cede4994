"""cdcl: semi-supervised nucleus segmentation with Cross-patch Dense Contrastive Learning."""

__version__ = "0.1.0"
