"""The teacher's output head, held frozen by the learner for `teacher_need="hidden"`.

A teacher that ships hidden states sends [B,T,d] (d ≪ V: 896 vs 151,936 for Qwen2.5-0.5B)
instead of [B,T,V] logits; the learner turns them back into the teacher's exact logits
with one matmul per micro-batch, so every full-vocabulary divergence runs unchanged.

What travels is the *input of the head* — the last hidden state after the final norm, as
the teacher's own `lm_head` reads it — rather than the state before the norm: the learner
then holds only the head (a linear map, `V×d` plus an optional bias), never re-implements
a model family's norm (RMSNorm variants, Gemma's `1 + w`), and cannot drift from it. The
teacher checks that its logits are exactly `head(hidden)` (no softcapping or logit scaling
after the head) before shipping; `protege.actors.teacher` raises otherwise.

The head is not an algorithm module (`AlgorithmDefaults.modules`): those are trained,
checkpointed and exported with the student, and this one is none of these. The learner
loads it once per rank, on the first batch that carries hidden states.

Shapes: B rows, T response tokens, d teacher hidden size, V teacher vocabulary, N tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from protege.cpu_bf16 import compute_dtype
from protege.modeling import DTYPES, load_model, load_model_config, resolve_path
from protege.records import RolloutBatch

# float32 logits one head matmul may produce at once (256 MB): bounds the [tokens, V]
# temporaries beside the micro-batch's own [B,T,V] output.
CHUNK_ELEMENTS = 2**26


class TeacherHead:
    """A frozen copy of a teacher's output head on the learner's device."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, name: str = "teacher"):
        self.weight = weight.detach()  # [V,d]
        self.bias = None if bias is None else bias.detach()  # [V]
        self.name = name

    @classmethod
    def load(
        cls, name: str, dtype: str = "float32", device: str | torch.device = "cpu"
    ) -> TeacherHead:
        """The head of the model at `name`, in `dtype` (the teacher's), on `device`. Reads only
        the head's tensors from safetensors (the input embedding when the model ties them);
        other checkpoints load the whole model once and keep its head."""
        tensors = _read_head(name) or _head_of_model(name, dtype)
        rounded = DTYPES[dtype]  # the head computes as the teacher's does (protege.cpu_bf16)
        computed = compute_dtype(rounded, device)
        weight, bias = (None if t is None else t.to(device, rounded).to(computed) for t in tensors)
        return cls(weight, bias, name)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """[B,T,d] hidden states -> [B,T,V] float32 teacher logits at the `mask`ed [B,T]
        positions (0 elsewhere), computed in the head's dtype as the teacher's own head
        computes them, a bounded number of tokens at a time."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"the batch's teacher hidden states are {hidden.shape[-1]} wide, but the "
                f"learner's head of teacher {self.name!r} reads {self.hidden_size}: the "
                "scoring teacher and teachers.0.model must be the same model"
            )
        out = torch.zeros((*mask.shape, self.vocab_size), dtype=torch.float32, device=hidden.device)
        rows, positions = mask.nonzero(as_tuple=True)
        chunk = max(1, CHUNK_ELEMENTS // self.vocab_size)
        for start in range(0, rows.numel(), chunk):
            r, t = rows[start : start + chunk], positions[start : start + chunk]
            states = hidden[r, t].to(self.weight.dtype)  # [N,d]
            out[r, t] = F.linear(states, self.weight, self.bias).float()
        return out

    def decode(self, batch: RolloutBatch) -> RolloutBatch:
        """`batch` with `teacher_logits` decoded from its `teacher_hidden` (dropped)."""
        with torch.no_grad():
            logits = self.logits(batch.teacher_hidden, batch.response_mask.bool())
        return batch.replace(teacher_logits=logits, teacher_hidden=None)


def _read_head(name: str) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) read lazily from the model's safetensors, or None when its files
    are not safetensors or do not hold the head under the model's own parameter names."""
    path = Path(resolve_path(name))
    files = _safetensors_index(path)
    if files is None:
        return None
    weight_names, bias_name = _head_parameter_names(name)
    weight_name = next((n for n in weight_names if n in files), None)
    if weight_name is None or (bias_name is not None and bias_name not in files):
        return None
    return _tensor(path, files, weight_name), (
        None if bias_name is None else _tensor(path, files, bias_name)
    )


def _head_parameter_names(name: str) -> tuple[list[str], str | None]:
    """Names the head's weight may be saved under (its own; the input embedding's when tied:
    HF saves one copy of tied weights) and its bias's name, from a weightless skeleton."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(load_model_config(name))
    head, embedding = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    module_names = {id(module): n for n, module in skeleton.named_modules()}
    names = [f"{module_names[id(head)]}.weight"]
    if embedding is not None and head.weight is embedding.weight:
        names.append(f"{module_names[id(embedding)]}.weight")
    bias = None if getattr(head, "bias", None) is None else f"{module_names[id(head)]}.bias"
    return names, bias


def _safetensors_index(path: Path) -> dict[str, str] | None:
    """{tensor name: safetensors file} of a model directory, or None without safetensors."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), "pt") as handle:
        return dict.fromkeys(handle.keys(), single.name)


def _tensor(path: Path, files: dict[str, str], key: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(path / files[key]), "pt") as handle:
        return handle.get_tensor(key)


def _head_of_model(name: str, dtype: str) -> tuple[Tensor, Tensor | None]:
    head = load_model(name, dtype).get_output_embeddings()
    return head.weight.detach().clone(), (
        None if getattr(head, "bias", None) is None else head.bias.detach().clone()
    )
