"""hf-minitron: turn one Hugging Face causal LM into a family of smaller ones (Minitron pruning + distillation)."""

__version__ = "0.1.0"
