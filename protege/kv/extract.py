"""Per-layer key/value caches from HF causal LMs (the teacher scorer in
`protege.actors.kv_teacher` and `StudentForward.kv` both read them through here).

A cache layer is K and V of shape [B, H_kv, T, D] with H_kv = `num_key_value_heads` (GQA/MQA:
fewer than the query heads) and D = head_dim. HF caches keys *after* RoPE; teachers hand out
keys with their rotation undone (`undo_rope`), already moved onto the student's time axis,
so a target needs only a projection and the student's rotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from protege.kv.batch import KVBatch, TimeAlign, alignment_matrices
from protege.kv.cache import LayerKV
from protege.kv.rope import RopeSpec, apply_rope, undo_rope
from protege.kv.time_align import pool_teacher


@dataclass(frozen=True)
class KVSpec:
    """The KV-cache shape of a model: what a projector maps from or to."""

    layers: int
    kv_heads: int  # num_key_value_heads: the cache's head count
    query_heads: int  # num_attention_heads: only queries have this many
    head_dim: int
    hidden_size: int
    rope: RopeSpec

    @classmethod
    def from_config(cls, config: Any) -> KVSpec:
        query_heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or query_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // query_heads)
        if query_heads % kv_heads:
            raise ValueError(
                f"num_attention_heads={query_heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        return cls(
            int(config.num_hidden_layers),
            kv_heads,
            query_heads,
            head_dim,
            int(config.hidden_size),
            RopeSpec.from_config(config),
        )


def check_cache_shape(tensor: Tensor, spec: KVSpec, layer: int, what: str = "keys") -> None:
    """Raise naming the mismatch; in particular a query-head count where KV heads belong."""
    if tensor.dim() != 4:
        raise ValueError(f"layer {layer} {what}: expected [B,H_kv,T,D], got {tuple(tensor.shape)}")
    heads, dim = tensor.shape[1], tensor.shape[3]
    if heads != spec.kv_heads:
        hint = (
            " — that is num_attention_heads (query heads); KV caches have num_key_value_heads"
            if heads == spec.query_heads
            else ""
        )
        raise ValueError(
            f"layer {layer} {what}: {heads} heads, expected num_key_value_heads={spec.kv_heads}{hint}"
        )
    if dim != spec.head_dim:
        raise ValueError(f"layer {layer} {what}: head dim {dim}, expected head_dim={spec.head_dim}")


@dataclass
class ModelPass:
    """What one forward of a causal LM gives KV distillation."""

    kv: LayerKV  # post-RoPE keys, as cached
    logits: Tensor  # [B,T,V]
    hidden: Tensor  # [B,T,hidden] last hidden state
    queries: tuple[Tensor, ...] | None  # L × [B,H_q,T,D] post-RoPE, when asked for


def forward_kv(
    model: torch.nn.Module, batch: KVBatch, spec: KVSpec, with_queries: bool = False
) -> ModelPass:
    """One forward of a right-padded KVBatch with the cache on (see `forward_sequences`)."""
    return forward_sequences(
        model, batch.input_ids, batch.attention_mask, batch.positions, spec, with_queries
    )


def forward_sequences(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    positions: Tensor,
    spec: KVSpec,
    with_queries: bool = False,
) -> ModelPass:
    """One forward with the cache on; gradients flow through the returned tensors.
    input_ids, attention_mask, positions [B,T] (any padding layout).

    Queries are captured by a hook on each layer's `self_attn.q_proj` (Llama/Qwen-style
    decoders) and rotated with the model's RoPE, so `softmax(q·kᵀ/√D)` reproduces the
    model's attention logits.
    """
    device = next(model.parameters()).device
    captured: list[Tensor] = []
    hooks = []
    if with_queries:
        for layer in _decoder_layers(model):
            hooks.append(
                layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(o))
            )
    try:
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.long().to(device),
            position_ids=positions.to(device),
            use_cache=True,
            output_hidden_states=True,
        )
    finally:
        for hook in hooks:
            hook.remove()
    cache = out.past_key_values
    keys = tuple(layer.keys for layer in cache.layers)
    values = tuple(layer.values for layer in cache.layers)
    if len(keys) != spec.layers:
        raise ValueError(
            f"cache has {len(keys)} layers, config says num_hidden_layers={spec.layers}"
        )
    for i, (k, v) in enumerate(zip(keys, values)):
        check_cache_shape(k, spec, i, "keys")
        check_cache_shape(v, spec, i, "values")
    queries = None
    if with_queries:
        b, t = input_ids.shape
        positions = positions.to(device)
        queries = tuple(
            apply_rope(
                q.view(b, t, spec.query_heads, spec.head_dim).transpose(1, 2), positions, spec.rope
            )
            for q in captured
        )
    return ModelPass(LayerKV(keys, values), out.logits, out.hidden_states[-1], queries)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Llama/Qwen-style model, however it is wrapped (DeepSpeed
    engine, peft, the learner's student-plus-modules container): the first `….layers`
    ModuleList whose items have `self_attn.q_proj`."""
    for name, module in model.named_modules():
        is_list = name.endswith("layers") and isinstance(module, torch.nn.ModuleList)
        if is_list and len(module) and hasattr(getattr(module[0], "self_attn", None), "q_proj"):
            return list(module)
    raise ValueError(
        f"{type(model).__name__} has no decoder layers with self_attn.q_proj; query capture "
        "needs a Llama/Qwen-style decoder"
    )


def to_student_time(
    kv: LayerKV, teacher: KVBatch, student: KVBatch, spec: KVSpec, mode: TimeAlign
) -> LayerKV:
    """Teacher cache -> keys without RoPE (undone at the teacher's own positions), both K
    and V pooled onto the student's steps. L × [B,H_t,T_t,D_t] -> L × [B,H_t,T_s,D_t]."""
    positions = teacher.positions.to(kv.keys[0].device)
    keys = [undo_rope(k, positions, spec.rope) for k in kv.keys]
    values = list(kv.values)
    align = alignment_matrices(student, teacher, mode)
    if align is not None:
        keys = [pool_teacher(k, align) for k in keys]
        values = [pool_teacher(v, align) for v in values]
    mask = student.attention_mask[:, None, :, None].to(keys[0].device)
    return LayerKV(tuple(k * mask for k in keys), tuple(v * mask for v in values))
