"""Training on the torch backend: the loop (`loop.train`), the model set-up, the sharding strategy,
checkpoint state and the final export."""

from .loop import train

__all__ = ["train"]
