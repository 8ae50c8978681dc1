"""Published architectures built from :mod:`attention_jax.nn`, and loaders for local Hugging Face checkpoints.

Each architecture is a config dataclass plus a model assembled from the library's stacks; its
``from_pretrained(path)`` reads a checkpoint directory (``config.json`` + safetensors) without torch.
"""
