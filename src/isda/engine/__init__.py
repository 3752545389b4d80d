"""Training machinery: the trainer, its schedule, evaluation, checkpoints and torch.distributed helpers."""

from .checkpoint import CheckpointError
from .evaluation import evaluate
from .sampling import SeededSamples
from .schedule import adamw, lr_factor, param_groups
from .trainer import NonFiniteLossError, OnValidation, train

__all__ = ["CheckpointError", "NonFiniteLossError", "OnValidation", "SeededSamples", "evaluate", "lr_factor",
           "param_groups", "train"]
