"""The model registry: one explicit dict, no lookups by name."""

from recsys_pretrain.models.bert4rec import BERT4Rec
from recsys_pretrain.models.mf import MF

MODELS = {"mf": MF, "bert4rec": BERT4Rec}

__all__ = ["BERT4Rec", "MF", "MODELS"]
