"""SAMv2 anatomical embeddings as MONAI components."""

__version__ = "0.1.0"
