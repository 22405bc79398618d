"""Classification: labels, KD losses, metrics, robustness, targeted transfer and RoS-KD.

The pipeline verbs `label`, `predict` and `evaluate` dispatch here for classification runs; training uses these
pieces through the engine's classification adapter (`nakt.train.classification`). Nothing here imports
`nakt.train`.
"""

from nakt.classify.losses import kd_loss
from nakt.classify.metrics import classification_scores

__all__ = ["kd_loss", "classification_scores"]
