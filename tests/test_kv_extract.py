"""KV extraction: GQA/MQA head counts, equality with the model's own cache, RoPE frame,
captured queries, teacher workers with time alignment, and the offline shard store."""

from __future__ import annotations

import pytest
import torch

from protege.kv.batch import make_batch
from protege.kv.extract import KVSpec, TeacherKVWorker, check_cache_shape, forward_kv
from protege.kv.loss import attention_logprobs
from protege.kv.rope import undo_rope
from protege.kv.store import read_store, write_store
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


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv_teacher")
    _model(1, heads=6, hidden=96, layers=3, seed=5).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return str(path)


def test_worker_returns_unroped_keys_on_the_student_time_axis(teacher_dir):
    tokenizer = build_char_tokenizer()
    student = make_batch(tokenizer, ROWS)
    worker = TeacherKVWorker(teacher_dir)
    kv = worker.extract(ROWS, student)
    spec = worker.kv_spec()
    with torch.no_grad():
        cache = forward_kv(worker.model, student, spec).kv
    pad = ~student.attention_mask[:, None, :, None]
    for k, cached in zip(kv.keys, cache.keys):
        assert k.shape == (3, 1, student.input_ids.shape[1], 16)
        expected = undo_rope(cached, student.positions, spec.rope).masked_fill(pad, 0.0)
        assert torch.allclose(k, expected, atol=1e-6)

    # A teacher that reads a prefix: char alignment puts its suffix tokens on the student's.
    prefix = "1+1=2;"
    prefixed = TeacherKVWorker(teacher_dir, prefix=prefix, time_align="char").extract(ROWS, student)
    segment = TeacherKVWorker(teacher_dir, prefix=prefix, time_align="segment").extract(
        ROWS, student
    )
    teacher_batch = make_batch(tokenizer, ROWS, prefix)
    with torch.no_grad():
        own = forward_kv(worker.model, teacher_batch, spec).kv
    shift = len(prefix)
    for b in range(3):
        n = int(student.lengths[b])
        own_k = undo_rope(own.keys[0], teacher_batch.positions, spec.rope)[b, :, shift : shift + n]
        assert torch.allclose(prefixed.keys[0][b, :, :n], own_k, atol=1e-6)
        # segment: the answer maps one-to-one; the prompt span is resampled
        p = int(student.prompt_lengths[b])
        assert torch.allclose(
            segment.values[1][b, :, p:n], own.values[1][b, :, shift + p : shift + n], atol=1e-6
        )


def test_offline_store_round_trip(tmp_path, teacher_dir):
    tokenizer = build_char_tokenizer()
    workers = [
        TeacherKVWorker(teacher_dir),
        TeacherKVWorker(teacher_dir, prefix="5+5=10;", time_align="char"),
    ]

    def extract(rows, student):
        return [w.extract(rows, student) for w in workers]

    def student_batch(rows):
        return make_batch(tokenizer, rows)

    write_store(tmp_path, ROWS, ["a", "b"], student_batch, extract, shard_rows=2)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]
    table = read_store(tmp_path)
    batch, kv = table.sample(torch.tensor([0, 2]))
    rows = [ROWS[0], ROWS[2]]
    direct = extract(rows, make_batch(tokenizer, rows))
    assert torch.equal(batch.input_ids, make_batch(tokenizer, rows).input_ids)
    for got, want in zip(kv, direct):
        for a, b in zip(got.keys + got.values, want.keys + want.values):
            assert torch.allclose(a, b, atol=1e-6)
    mtime = (tmp_path / "index.json").stat().st_mtime_ns
    write_store(
        tmp_path, ROWS, ["a", "b"], student_batch, extract, shard_rows=2
    )  # same fingerprint: reused
    assert (tmp_path / "index.json").stat().st_mtime_ns == mtime
