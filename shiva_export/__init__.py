"""shiva_export: compile Shiva-DiT token-pruned Diffusion Transformers into static engines."""

__version__ = "0.1.0"
