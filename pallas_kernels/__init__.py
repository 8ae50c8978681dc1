"""Pallas kernels for attention (floor 1: imports jax only, never attention_jax)."""

from pallas_kernels import layouts, mask_info
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.ring_attention import ring_attention

__all__ = ["BlockSizes", "decode_attention", "flash_attention", "layouts", "mask_info", "ring_attention"]
