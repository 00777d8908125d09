"""layerprobe: layerwise analysis of speech self-supervised models."""

__version__ = "0.1.0"
