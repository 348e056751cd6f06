"""bfloat16-stored frozen models on CPUs without bfloat16 arithmetic (protege.cpu_bf16):
the logits are a float32 model's whose weights were rounded to bfloat16, the decoder
layers' weights take half the bytes, and a tied head stays tied."""

from __future__ import annotations

import copy

import pytest
import torch

from protege.cpu_bf16 import UpcastLinear, bf16_storage, compute_dtype, native_bf16_cpu
from protege.modeling import load_frozen_model, load_model


def rounded_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The definition: every weight rounded to bfloat16, everything computed in float32."""
    reference = copy.deepcopy(model)
    for parameter in reference.parameters():
        parameter.data = parameter.data.to(torch.bfloat16).float()
    return reference


def linear_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == dtype)


def test_bf16_storage_computes_the_rounded_weights_in_float32(tiny_dirs):
    fp32 = load_model(tiny_dirs["teacher"]).eval()
    reference = rounded_reference(fp32)
    stored = bf16_storage(load_model(tiny_dirs["teacher"], "bfloat16").eval())
    ids = torch.randint(4, 20, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = reference(input_ids=ids).logits, stored(input_ids=ids).logits
        plain = fp32(input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, rtol=1e-6, atol=1e-6)  # the weights are rounded
    layers = [m for m in stored.modules() if isinstance(m, UpcastLinear)]
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    assert stored.get_output_embeddings().weight.dtype == torch.float32
    half = linear_bytes(stored, torch.bfloat16)
    assert half == sum(
        m.weight.numel() * 2 + (m.bias.numel() * 2 if m.bias is not None else 0) for m in layers
    )


def test_a_tied_head_stays_tied_to_its_embedding(tiny_dirs):
    model = load_model(tiny_dirs["teacher"], "bfloat16")
    if not model.config.tie_word_embeddings:
        pytest.skip("the tiny teacher unties its head")
    stored = bf16_storage(model)
    head, embedding = stored.get_output_embeddings(), stored.get_input_embeddings()
    assert head.weight is embedding.weight and head.weight.dtype == torch.float32


@pytest.mark.skipif(native_bf16_cpu(), reason="this CPU computes bfloat16 natively")
def test_a_bfloat16_frozen_teacher_on_this_cpu_stores_bf16_and_computes_float32(tiny_dirs):
    frozen = load_frozen_model(tiny_dirs["teacher"], "bfloat16")
    assert compute_dtype(torch.bfloat16, "cpu") == torch.float32
    assert any(p.dtype == torch.bfloat16 for p in frozen.parameters())
    ids = torch.randint(4, 20, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = frozen(input_ids=ids).logits
        want = rounded_reference(load_model(tiny_dirs["teacher"]).eval())(input_ids=ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert compute_dtype(torch.bfloat16, "meta") == torch.bfloat16  # not a CPU: bf16 as asked
