"""The thin training loop: sparse coders trained on a causal LM's activations (``binsparse train``)."""

from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
