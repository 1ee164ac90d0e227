from samv2_components.inference.bundle_pipeline import BundlePipeline, read_bundle_config, section_settings
from samv2_components.inference.cache import CachedEmbeddingInferer, network_fingerprint
from samv2_components.inference.embedder import SAMv2Inferer, bf16_supported

__all__ = [
    "SAMv2Inferer",
    "bf16_supported",
    "CachedEmbeddingInferer",
    "network_fingerprint",
    "BundlePipeline",
    "read_bundle_config",
    "section_settings",
]
