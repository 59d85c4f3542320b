"""Models that ship with hydra-offload: small, download-free, used by ``run.py`` and the tests."""

from hydra_offload.models.decoder import DecoderBlock, DecoderLM
from hydra_offload.models.lightning import LitDecoderLM, random_tokens

__all__ = ["DecoderBlock", "DecoderLM", "LitDecoderLM", "random_tokens"]
