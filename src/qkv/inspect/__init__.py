"""qkv.inspect: see each mechanism at work — attention heads (maps, entropy, previous-token /
induction / sink scores), the logit lens, embeddings and position encodings, KV-cache
arithmetic, and MoE routing. Everything runs on a private shadow of the model (shared
weights), so inspecting never disturbs a model that is also serving."""

from qkv.inspect.attention import (
    HeadReport,
    attention_map,
    capture_attention,
    classify_heads,
    first_token_score,
    head_entropy,
    induction_score,
    previous_token_score,
)
from qkv.inspect.kv import kv_cache_bytes, kv_variants
from qkv.inspect.logit_lens import lens_logits, logit_lens

__all__ = [
    "HeadReport",
    "attention_map",
    "capture_attention",
    "classify_heads",
    "induction_score",
    "previous_token_score",
    "first_token_score",
    "head_entropy",
    "kv_cache_bytes",
    "kv_variants",
    "lens_logits",
    "logit_lens",
]
