"""Training on synthetic worlds: the trainer, model presets, checkpoint schedules, sweeps."""

from engramlab.train.trainer import TrainConfig, Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
