"""The one LoRA recipe (component tier): the learner, the HF sampler and the vLLM adapter
directory all get the same adapter from `student.lora`."""

from __future__ import annotations

import json

import torch

from protege.config import LoraConfig
from protege.lora import TASK_TYPE, adapter_config_dict, peft_config, wrap_with_lora
from protege.modeling import load_model

LORA = LoraConfig(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])


def _adapter_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k}


def test_peft_config_is_the_student_lora_section():
    config = peft_config(LORA)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8.0, 0.0)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.task_type == TASK_TYPE


def test_adapter_config_is_what_peft_writes(tiny_dirs, tmp_path):
    model = wrap_with_lora(load_model(tiny_dirs["student"], "float32"), LORA, seed=0)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = json.loads(json.dumps(adapter_config_dict(LORA)))  # serialisable as it stands
    written.pop("base_model_name_or_path")
    ours.pop("base_model_name_or_path")
    # peft writes its set of target modules as a list in set order; ours is sorted
    assert sorted(written.pop("target_modules")) == ours.pop("target_modules")
    assert ours == written


def test_wrap_is_seeded_starts_as_the_identity_and_leaves_the_global_rng(tiny_dirs):
    ids = torch.tensor([[1, 2, 3, 4]])
    base = load_model(tiny_dirs["student"], "float32").eval()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    state = torch.get_rng_state()
    first = wrap_with_lora(base, LORA, seed=3).eval()
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        assert torch.allclose(first(input_ids=ids).logits, expected)  # B = 0
    again = wrap_with_lora(load_model(tiny_dirs["student"], "float32"), LORA, seed=3)
    other = wrap_with_lora(load_model(tiny_dirs["student"], "float32"), LORA, seed=4)
    a, b, c = _adapter_a(first), _adapter_a(again), _adapter_a(other)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_vllm_adapter_directory_loads_in_peft_as_the_same_adapter(tiny_dirs, tmp_path):
    """What the vLLM sampler writes per version (importable without vLLM): peft reads it
    back to the same model."""
    from peft import PeftModel, get_peft_model_state_dict

    from protege.actors.vllm_engine import write_adapter

    trained = wrap_with_lora(load_model(tiny_dirs["student"], "float32"), LORA, seed=0).eval()
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    path = write_adapter(get_peft_model_state_dict(trained), LORA, tmp_path / "v1")
    loaded = PeftModel.from_pretrained(load_model(tiny_dirs["student"], "float32"), path).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, loaded(input_ids=ids).logits
        assert not torch.allclose(
            expected, load_model(tiny_dirs["student"], "float32")(input_ids=ids).logits
        )
    assert torch.allclose(got, expected, atol=1e-6)
