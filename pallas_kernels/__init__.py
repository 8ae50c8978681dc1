"""Pallas kernels for attention (floor 1: imports jax only, never attention_jax)."""

from pallas_kernels import mask_info

__all__ = ["mask_info"]
