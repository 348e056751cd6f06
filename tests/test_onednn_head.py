"""The oneDNN output head of frozen CPU models (protege.onednn_head): the same logits as
nn.Linear to float32 rounding, the same parameters and ties, weight updates seen at once,
gradients untouched, and left alone where it does not apply."""

from __future__ import annotations

import pytest
import torch

from protege.modeling import load_model
from protege.onednn_head import OneDNNLinear, fast_output_head, onednn_matches

pytestmark = pytest.mark.skipif(not onednn_matches(), reason="this torch has no usable oneDNN op")


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(seed))


def test_same_logits_parameters_and_ties(tiny_dirs):
    plain = load_model(tiny_dirs["student"]).eval()
    fast = fast_output_head(load_model(tiny_dirs["student"]).eval())
    head = fast.get_output_embeddings()
    assert isinstance(head, OneDNNLinear)
    assert plain.state_dict().keys() == fast.state_dict().keys()
    if plain.config.tie_word_embeddings:
        assert head.weight is fast.get_input_embeddings().weight
    ids = tokens(plain.config.vocab_size)
    with torch.no_grad():
        want, got = plain(ids).logits, fast(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_weight_update_is_seen_by_the_next_forward(tiny_dirs):
    """The sampler copies new weights in place at every sync: no stale packed copy."""
    fast = fast_output_head(load_model(tiny_dirs["student"]).eval())
    target = load_model(tiny_dirs["student"]).eval()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    fast.load_state_dict(target.state_dict())
    ids = tokens(target.config.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, target(ids).logits, rtol=1e-5, atol=1e-5)


def test_gradients_go_through_nn_linear(tiny_dirs):
    """A model that is trained keeps exact nn.Linear gradients even with the switch."""
    plain, fast = (
        load_model(tiny_dirs["student"]),
        fast_output_head(load_model(tiny_dirs["student"])),
    )
    ids = tokens(plain.config.vocab_size, seed=3)
    grads = []
    for model in (plain, fast):
        model.zero_grad()
        model(ids).logits.square().mean().backward()
        grads.append(model.get_output_embeddings().weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_other_dtypes_keep_nn_linear(tiny_dirs):
    model = fast_output_head(load_model(tiny_dirs["student"], dtype="bfloat16"))
    assert type(model.get_output_embeddings()) is torch.nn.Linear
