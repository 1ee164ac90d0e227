from samv2_components.inference.cache import CachedEmbeddingInferer, network_fingerprint
from samv2_components.inference.embedder import SAMv2Inferer, bf16_supported

__all__ = ["SAMv2Inferer", "bf16_supported", "CachedEmbeddingInferer", "network_fingerprint"]
