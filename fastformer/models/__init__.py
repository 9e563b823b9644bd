"""GPT-2 and BERT on fastformer's fused ops, loading Hugging Face weights; see gpt.py, bert.py, loading.py."""

from fastformer.models.bert import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)
from fastformer.models.config import BertConfig, GPTConfig
from fastformer.models.generation import KVCache
from fastformer.models.gpt import GPT
from fastformer.models.outputs import ModelOutput

__all__ = [
    "GPT",
    "BertConfig",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertModel",
    "GPTConfig",
    "KVCache",
    "ModelOutput",
]
