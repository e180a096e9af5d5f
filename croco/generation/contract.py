"""What every generation backend follows: it returns k `Completion`s per conversation, and
sample i of a conversation draws with `conversation_seed(seed, conversation) + i`.

Kept apart from the package's `__init__`, the factory that imports the backends: the
backends import this module, never the package that imports them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" or "length"


def conversation_seed(seed: int, conversation: list[dict]) -> int:
    """A conversation's seed, from the stage's seed and the conversation's content only;
    its sample i draws with `conversation_seed + i` (vLLM's rule for a request's n samples,
    followed by the transformers backend too). So a sample depends on (seed, prompt,
    sample index) and on nothing else: not on the batch size, the shard or the other
    prompts of the call."""
    digest = hashlib.sha256(json.dumps([seed, conversation], sort_keys=True,
                                       ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 2**16)  # room for seed + i
