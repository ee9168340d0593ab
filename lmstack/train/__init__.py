"""One training loop (`loop.train`) and the losses of the fine-tuning methods (`losses`)."""

from lmstack.train.loop import TrainConfig, TrainResult, lr_at, train

__all__ = ["TrainConfig", "TrainResult", "lr_at", "train"]
