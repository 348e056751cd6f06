"""RoPE in HF's layout: specs from configs, apply/undo, and agreement with a Qwen2 KV cache."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from protege.kv.rope import RopeSpec, apply_rope, inverse_frequencies, reframe_keys, undo_rope


def _brute_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary: int):
    """Loop over (i, i + R/2) planes: [a, b] -> [a·cos − b·sin, b·cos + a·sin]."""
    out = x.clone().double()
    half = rotary // 2
    for t in range(x.shape[2]):
        for i in range(half):
            angle = float(positions[t]) * float(inv_freq[i])
            a, b = x[:, :, t, i].double(), x[:, :, t, i + half].double()
            out[:, :, t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, :, t, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_inverse_frequencies_formula_and_scalings():
    spec = RopeSpec(theta=10000.0, head_dim=16)
    expected = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)])
    torch.testing.assert_close(inverse_frequencies(spec), expected)
    linear = RopeSpec(theta=10000.0, head_dim=16, scaling="linear", factor=4.0)
    torch.testing.assert_close(inverse_frequencies(linear), expected / 4)
    ntk = RopeSpec(theta=10000.0, head_dim=16, scaling="ntk", factor=4.0)
    ntk_base = 10000.0 * 4.0 ** (16 / 14)
    torch.testing.assert_close(
        inverse_frequencies(ntk), torch.tensor([ntk_base ** (-2 * i / 16) for i in range(8)])
    )
    assert inverse_frequencies(RopeSpec(10000.0, 16, partial=0.5)).shape == (4,)


def test_apply_rope_matches_plane_rotation_loop_with_partial_rotation():
    spec = RopeSpec(theta=500.0, head_dim=12, partial=2 / 3)  # rotates the first 8 features
    x = torch.randn(2, 3, 5, 12, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 30])
    out = apply_rope(x, positions, spec)
    torch.testing.assert_close(out, _brute_rope(x, positions, inverse_frequencies(spec), 8))
    torch.testing.assert_close(out[..., 8:], x[..., 8:])


def test_undo_is_the_exact_inverse_and_reframe_with_same_spec_is_identity():
    spec = RopeSpec(theta=10000.0, head_dim=16)
    x = torch.randn(2, 3, 9, 16)
    positions = torch.arange(9).expand(2, 9) + torch.tensor([[0], [4]])  # per-row offsets
    torch.testing.assert_close(undo_rope(apply_rope(x, positions, spec), positions, spec), x)
    torch.testing.assert_close(apply_rope(undo_rope(x, positions, spec), positions, spec), x)
    assert torch.equal(reframe_keys(x, positions, spec, spec), x)
    other = RopeSpec(theta=1e6, head_dim=16, scaling="linear", factor=2.0)
    torch.testing.assert_close(reframe_keys(x, positions, spec, RopeSpec(10000.0, 16)), x)
    there = reframe_keys(x, positions, spec, other)
    torch.testing.assert_close(reframe_keys(there, positions, other, spec), x, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="undo_rope"):
        reframe_keys(x, positions, spec, RopeSpec(10000.0, 8))


def test_linear_scaling_equals_dividing_positions():
    x = torch.randn(1, 2, 6, 16)
    positions = torch.arange(6)
    linear = RopeSpec(10000.0, 16, scaling="linear", factor=3.0)
    plain = RopeSpec(10000.0, 16)
    torch.testing.assert_close(
        apply_rope(x, positions, linear), apply_rope(x, positions / 3.0, plain)
    )


def test_spec_validation_and_shape_errors():
    with pytest.raises(ValueError, match="scaling"):
        RopeSpec(10000.0, 16, scaling="yarn")
    with pytest.raises(ValueError, match="even"):
        RopeSpec(10000.0, 6, partial=0.5)
    with pytest.raises(ValueError, match=r"D=16"):
        apply_rope(torch.randn(1, 2, 3, 8), torch.arange(3), RopeSpec(10000.0, 16))
    with pytest.raises(ValueError, match="T=3"):
        apply_rope(torch.randn(1, 2, 3, 16), torch.arange(4), RopeSpec(10000.0, 16))


def test_from_config_reads_new_and_legacy_layouts():
    from transformers import LlamaConfig

    from protege.tasks.tiny_models import tiny_config

    assert RopeSpec.from_config(tiny_config()) == RopeSpec(theta=10000.0, head_dim=16)
    llama = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_theta=5e5,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    assert RopeSpec.from_config(llama) == RopeSpec(5e5, 16, scaling="linear", factor=2.0)
    legacy = SimpleNamespace(
        rope_theta=1e6,
        rope_scaling={"type": "linear", "factor": 4.0},
        hidden_size=256,
        num_attention_heads=8,
        head_dim=64,
        partial_rotary_factor=0.5,
    )
    assert RopeSpec.from_config(legacy) == RopeSpec(1e6, 64, "linear", 4.0, 0.5)
    plain_legacy = SimpleNamespace(
        rope_theta=1e4, rope_scaling=None, hidden_size=64, num_attention_heads=4
    )
    assert RopeSpec.from_config(plain_legacy) == RopeSpec(1e4, 16)
    nested = SimpleNamespace(
        rope_parameters={"full_attention": {"rope_theta": 1e6, "rope_type": "default"}},
        hidden_size=64,
        num_attention_heads=4,
    )
    assert RopeSpec.from_config(nested, layer_type="full_attention") == RopeSpec(1e6, 16)
    with pytest.raises(ValueError, match="layer_type"):
        RopeSpec.from_config(nested)
    yarn = SimpleNamespace(
        rope_theta=1e4,
        rope_scaling={"rope_type": "yarn", "factor": 4.0},
        hidden_size=64,
        num_attention_heads=4,
    )
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        RopeSpec.from_config(yarn)


def test_inverse_frequencies_match_hf_rope_init_functions():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_theta=5e5,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["linear"](config, "cpu")
    torch.testing.assert_close(inverse_frequencies(RopeSpec.from_config(config)), hf_inv_freq)


def test_apply_rope_reproduces_the_keys_in_a_qwen2_cache():
    from protege.tasks.tiny_models import build_tiny_model, tiny_config

    model = build_tiny_model(tiny_config(layers=2, hidden=64, heads=4, kv_heads=2), seed=3).eval()
    spec = RopeSpec.from_config(model.config)
    input_ids = torch.randint(4, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, output_hidden_states=True)
    positions = torch.arange(7)
    for layer_index, layer in enumerate(model.model.layers):
        cached_keys = out.past_key_values.layers[layer_index].keys  # [B,H_kv,T,D], post-RoPE
        cached_values = out.past_key_values.layers[layer_index].values
        with torch.no_grad():
            normed = layer.input_layernorm(out.hidden_states[layer_index])  # input to this layer
            raw_keys = layer.self_attn.k_proj(normed).view(2, 7, 2, 16).transpose(1, 2)
            raw_values = layer.self_attn.v_proj(normed).view(2, 7, 2, 16).transpose(1, 2)
        torch.testing.assert_close(apply_rope(raw_keys, positions, spec), cached_keys)
        torch.testing.assert_close(
            undo_rope(cached_keys, positions, spec), raw_keys, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(cached_values, raw_values)  # values carry no rotation
        assert not torch.allclose(raw_keys[:, :, 1:], cached_keys[:, :, 1:])  # RoPE did act


def test_head_mixing_commutes_with_rope_but_dim_projection_needs_the_raw_frame():
    from protege.kv.projector import KVProjector

    teacher = RopeSpec(10000.0, 16)
    student = RopeSpec(1e6, 8)
    positions = torch.arange(6)
    raw = torch.randn(2, 4, 6, 16)
    rotated = apply_rope(raw, positions, teacher)
    heads_only = KVProjector(4, 16, 2, 16)
    torch.testing.assert_close(heads_only(rotated), apply_rope(heads_only(raw), positions, teacher))
    projector = KVProjector(4, 16, 2, 8)  # undo -> project -> apply recovers the raw-frame map
    reframed = apply_rope(projector(undo_rope(rotated, positions, teacher)), positions, student)
    torch.testing.assert_close(reframed, apply_rope(projector(raw), positions, student))
