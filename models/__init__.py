"""Flax models for pathways_lite (decoder LM first); no runtime code in here."""
from models.attention import attention
from models.config import (BOS_ID, EOS_ID, PAD_ID, ModelConfig,
                           validate_seq_len)
from models.decoder import DecoderLM
from models.loss import chunked_cross_entropy, cross_entropy
from models.utils import flops_per_token, mfu, param_count, peak_flops_per_s

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "ModelConfig", "validate_seq_len",
    "DecoderLM", "attention", "cross_entropy", "chunked_cross_entropy",
    "param_count", "flops_per_token", "peak_flops_per_s", "mfu",
]
