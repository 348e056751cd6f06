"""KV extraction: GQA/MQA head counts, equality with the model's own cache, RoPE frame and
captured queries (the K-V teacher and its store: tests/test_kv_distill.py)."""

from __future__ import annotations

import pytest
import torch

from protege.kv.batch import make_batch
from protege.kv.extract import KVSpec, check_cache_shape, forward_kv
from protege.kv.loss import attention_logprobs
from protege.kv.rope import undo_rope
from protege.tasks.tiny_models import build_char_tokenizer, build_tiny_model, tiny_config

ROWS = [
    {"prompt": "12+3=", "completion": "15<eos>", "answer": "15"},
    {"prompt": "47+38=", "completion": "85<eos>", "answer": "85"},
    {"prompt": "9+90=", "completion": "99<eos>", "answer": "99"},
]


def _model(kv_heads: int, heads: int = 4, hidden: int = 64, layers: int = 2, seed: int = 0):
    config = tiny_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads)
    config._attn_implementation = "eager"  # so output_attentions returns the probabilities
    return build_tiny_model(config, seed).eval()


@pytest.mark.parametrize("kv_heads", [2, 1])  # GQA and MQA
def test_extraction_uses_kv_heads_and_matches_the_models_cache(kv_heads):
    model, tokenizer = _model(kv_heads), build_char_tokenizer()
    batch = make_batch(tokenizer, ROWS)
    spec = KVSpec.from_config(model.config)
    assert (spec.kv_heads, spec.query_heads, spec.head_dim) == (kv_heads, 4, 16)
    with torch.no_grad():
        out = forward_kv(model, batch, spec, with_queries=True)
        reference = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            position_ids=batch.positions,
            use_cache=True,
            output_hidden_states=True,
            output_attentions=True,
        )
    for layer in range(spec.layers):
        k, v = out.kv.keys[layer], out.kv.values[layer]
        assert k.shape == (3, kv_heads, batch.input_ids.shape[1], 16)
        assert torch.equal(k, reference.past_key_values.layers[layer].keys)
        assert torch.equal(v, reference.past_key_values.layers[layer].values)
        # cached keys are post-RoPE: undoing it gives k_proj(input_layernorm(h)) exactly
        attn_layer = model.model.layers[layer]
        h = attn_layer.input_layernorm(reference.hidden_states[layer])
        raw = attn_layer.self_attn.k_proj(h).view(3, -1, kv_heads, 16).transpose(1, 2)
        assert torch.allclose(undo_rope(k, batch.positions, spec.rope), raw, atol=1e-5)
        # captured queries reproduce the model's own attention probabilities on real rows
        probs = attention_logprobs(out.queries[layer], k, batch.attention_mask).exp()
        real = batch.attention_mask[:, None, :, None]
        assert torch.allclose(probs * real, reference.attentions[layer] * real, atol=1e-5)


def test_query_heads_passed_as_kv_heads_is_named():
    spec = KVSpec.from_config(_model(2).config)
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_cache_shape(torch.zeros(1, 4, 3, 16), spec, 0)  # 4 = query heads
    with pytest.raises(ValueError, match="head_dim=16"):
        check_cache_shape(torch.zeros(1, 2, 3, 32), spec, 0)
