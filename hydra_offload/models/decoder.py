"""A decoder-only transformer with Llama's layout, sized entirely by its arguments.

At its default sizes it is a few MB and runs anywhere; with ``hidden_size=4096,
num_layers=32, intermediate_size=11008, vocab_size=32000`` it has the shapes of a 7B Llama,
which is only useful on the ``meta`` device (for planning) or a large accelerator.

Parameter names follow Llama's (``layers.3.self_attn.q_proj.weight``,
``layers.3.mlp.down_proj.weight``), so name-segment filters written for real models work here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DecoderBlock", "DecoderLM"]


class _Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, *, dtype: torch.dtype | None) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden_states.shape
        shape = (batch, seq, self.num_heads, width // self.num_heads)
        q, k, v = (
            proj(hidden_states).view(shape).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, width))


class _MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype | None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """One pre-norm transformer block: causal self-attention, then a SwiGLU MLP."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden_size, dtype=dtype)
        self.self_attn = _Attention(hidden_size, num_heads, dtype=dtype)
        self.post_attention_layernorm = nn.RMSNorm(hidden_size, dtype=dtype)
        self.mlp = _MLP(hidden_size, intermediate_size, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DecoderLM(nn.Module):
    """A causal language model: token embedding, a stack of :class:`DecoderBlock`, a head.

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream; a multiple of ``num_heads``.
        num_layers: number of blocks in ``layers``, the stack prefetch offloading walks.
        num_heads: attention heads per block.
        intermediate_size: width of the MLP.
        tie_embeddings: share one matrix between ``embed_tokens`` and ``lm_head``.
        dtype: parameter dtype, a ``torch.dtype`` or its name (``"bfloat16"``); ``None`` uses
            torch's default.
        device: where to create the parameters (``"meta"`` allocates nothing); ``None`` uses
            the current default device.
        gradient_checkpointing: with gradients enabled, call each block through
            ``torch.utils.checkpoint`` (non-reentrant): its activations are not kept but
            recomputed in backward, where the block is called again (activation
            checkpointing; the offload keeps the block's weights in its slots for that).

    Example:
        >>> import torch
        >>> model = DecoderLM(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
        ...                   intermediate_size=64)
        >>> model(torch.zeros(1, 5, dtype=torch.long)).shape
        torch.Size([1, 5, 64])
        >>> with torch.device("meta"):  # plan a big one without allocating it
        ...     big = DecoderLM(hidden_size=4096, num_layers=32, num_heads=32,
        ...                     intermediate_size=11008, vocab_size=32000)
        >>> sum(p.numel() for p in big.parameters())
        6738415616
    """

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 256,
        num_layers: int = 8,
        num_heads: int = 4,
        intermediate_size: int = 704,
        tie_embeddings: bool = False,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("intermediate_size", intermediate_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        torch_dtype = _as_dtype(dtype)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(
                vocab_size, hidden_size, num_layers, num_heads, intermediate_size, torch_dtype
            )
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _build(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        torch_dtype: torch.dtype | None,
    ) -> None:
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, dtype=torch_dtype)
        self.layers = nn.ModuleList(
            DecoderBlock(hidden_size, num_heads, intermediate_size, dtype=torch_dtype)
            for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(hidden_size, dtype=torch_dtype)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False, dtype=torch_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, seq, vocab_size)`` for token ids ``(batch, seq)``."""
        hidden_states = self.embed_tokens(input_ids)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:
                hidden_states = checkpoint(layer, hidden_states, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states)
        return self.lm_head(self.norm(hidden_states))


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point torch dtype name such as 'float32' or "
            f"'bfloat16', got {dtype!r}"
        )
    return resolved
