"""Models that ship with hydra-offload: small, download-free, used by ``run.py`` and the tests."""

from hydra_offload.models.decoder import DecoderBlock, DecoderLM

__all__ = ["DecoderBlock", "DecoderLM"]
