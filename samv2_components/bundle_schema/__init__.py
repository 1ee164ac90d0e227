"""Vendored MONAI bundle metadata schema, so that ``metadata.json`` files can be validated offline.

Usage::

    from samv2_components.bundle_schema import META_SCHEMA_PATH
    # python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath <META_SCHEMA_PATH>

``monai.bundle.verify_metadata`` only downloads the schema URL named in the metadata when ``filepath`` does not
exist, so passing this path keeps validation offline. See ``README.md`` in this folder for the source.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["META_SCHEMA_PATH", "META_SCHEMA_SHA256", "META_SCHEMA_URL"]

#: absolute path of the vendored ``meta_schema_20240725.json``
META_SCHEMA_PATH: str = str(Path(__file__).resolve().parent / "meta_schema_20240725.json")

#: the URL that MONAI Model Zoo ``metadata.json`` files name in their ``schema`` field
META_SCHEMA_URL: str = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

#: SHA-256 of the vendored file; pass it as ``hash_val`` (with ``hash_type="sha256"``) to ``verify_metadata``
META_SCHEMA_SHA256: str = "c4d23e5f39d1d4c90d037a9f267d417c01f6c96bd3eafde9f9634a62081a5486"
