"""What the scripts in this folder share: the tiny model, its data, quiet Trainer settings."""

from __future__ import annotations

import torch

from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens

SIZES = {
    "num_layers": 4,
    "hidden_size": 32,
    "num_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 64,
}
QUIET = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def tiny_module(seed: int = 0) -> LitDecoderLM:
    """The same weights for the same seed, in every process."""
    torch.manual_seed(seed)
    return LitDecoderLM(DecoderLM(**SIZES))


def tokens(samples: int = 8, batch_size: int = 2, seed: int = 0):
    return random_tokens(
        vocab_size=SIZES["vocab_size"], seq_len=9, samples=samples, batch_size=batch_size, seed=seed
    )
