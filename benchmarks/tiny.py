"""Tiny random models for the benchmarks' --quick sizes, where the model's quality does
not matter: a 2-layer Llama (hidden size 32) with SmolLM2's tokenizer and chat template,
as the test suite builds them (tests/conftest.py). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path


def tiny_llama(out: Path, *, classifier: bool = False, seed: int = 0) -> str:
    """Save a seeded random 2-layer Llama to `out` (a causal LM, or a one-label sequence
    classifier) with SmolLM2's tokenizer; returns the folder as a model name for croco."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from croco.config import EMBEDDED_POLICY
    from croco.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED_POLICY))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, tie_word_embeddings=True,
        **({"num_labels": 1} if classifier else {}))
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
