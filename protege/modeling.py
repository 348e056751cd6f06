"""Loading HF models/tokenizers and the one forward pass every role shares.

Shapes: B batch, P prompt tokens (left-padded), T response tokens (right-padded), V vocab.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from protege.cpu_bf16 import bf16_storage, stores_only
from protege.errors import SetupError
from protege.onednn_head import fast_output_head
from protege.records import RolloutBatch

BUILTIN_PREFIX = "builtin:"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # what a hub model name looks like
# A run draws one progress bar (protege.progress); HF's per-load/per-save bars ("Loading
# weights", "Writing model shards") would interleave with it.
hf_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(name: str) -> str:
    """`builtin:tiny/<what>` -> a path inside the shipped assets; anything else unchanged
    (an HF directory or hub id)."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    from protege.tasks import tiny

    builtin = {
        "tiny/student": tiny.student_path,
        "tiny/teacher": tiny.teacher_path,
        "tiny/teacher_b": tiny.teacher_b_path,
        "tiny/teacher_bpe": tiny.teacher_bpe_path,
        "tiny/student_h32": tiny.student_h32_path,
        "tiny/tokenizer": tiny.tokenizer_path,
        "tiny/train": tiny.train_path,
        "tiny/test": tiny.test_path,
        "tiny/pretrain": tiny.pretrain_path,
        "tiny/osd_draft": tiny.osd_draft_path,
        "tiny/osd_traffic": tiny.osd_traffic_path,
        "tiny/osd_heldout": tiny.osd_heldout_path,
        "tiny/student_hint": tiny.student_hint_path,
        "tiny/multi_teacher/low": lambda: tiny.multi_teacher_path("low"),
        "tiny/multi_teacher/high": lambda: tiny.multi_teacher_path("high"),
        "tiny/multi_teacher/train": lambda: tiny.multi_teacher_path("train.jsonl"),
    }
    key = name[len(BUILTIN_PREFIX) :]
    if key not in builtin:
        known = ", ".join(BUILTIN_PREFIX + key for key in builtin)
        raise SetupError(f"unknown built-in asset {name!r}; known: {known}")
    return str(builtin[key]())


def check_model_dir(name: str, key: str) -> str:
    """The resolved local directory of the model `name` (config key or flag `key`), or a
    SetupError saying what is missing. Never reaches the network: a hub id is refused."""
    try:
        path = Path(resolve_path(name))
    except SetupError as error:
        raise SetupError(f"{key}: {error}") from None
    if path.is_file():
        raise SetupError(f"{key}: {path} is a file; pass the model's directory")
    if not path.is_dir():
        hub_like = HUB_ID.fullmatch(name) is not None
        example = f"{name} --local-dir DIR" if hub_like else f"ORG/MODEL --local-dir {name}"
        raise SetupError(
            f"{key}: {name!r} is not a local model directory; protege does not download models "
            "at run time (no network): download it first, e.g. "
            f"`huggingface-cli download {example}`, and pass the directory"
        )
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append(f"weights ({' / '.join(WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files ({' / '.join(TOKENIZER_FILES)})")
    if missing:
        raise SetupError(
            f"{key}: {path} has no {', no '.join(missing)}; is it a saved HF model directory? "
            "(save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))"
        )
    return str(path)


def load_model(
    name: str, dtype: str = "float32", device: str | torch.device | None = None
) -> PreTrainedModel:
    """The causal LM at `name` in `dtype`, on `device` (default: where HF puts it, the CPU)."""
    path = resolve_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.config.use_cache = False
    return model if device is None else model.to(device)


_FROZEN: dict[tuple[str, str, str], PreTrainedModel] = {}


def load_frozen_model(
    name: str, dtype: str = "float32", device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A read-only copy (eval mode, no gradients) of the model at `name` (bfloat16 weights
    computed in float32 on a CPU without bfloat16 arithmetic: protege.cpu_bf16), loaded once per
    process: in-process runs (`trainer.workers=local`) share one teacher between the teacher
    scorer and the sampler's decoding instead of holding two."""
    key = (str(Path(resolve_path(name)).resolve()), dtype, str(device))
    if key not in _FROZEN:
        model = load_model(name, dtype, device).eval().requires_grad_(False)
        if stores_only(DTYPES[dtype], device):  # no bfloat16 arithmetic on this CPU
            model = bf16_storage(model)
        _FROZEN[key] = fast_output_head(model)
    return _FROZEN[key]


def load_model_config(name: str):
    """The HF config of the model at `name` (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_path(name))


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (for generation) and a checked EOS/pad pair."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(name))
    if tokenizer.eos_token_id is None:
        raise SetupError(
            f"the tokenizer of {name!r} has no EOS token, so responses could never end; set "
            "`eos_token` in its tokenizer_config.json (or tokenizer.eos_token = ... and "
            "tokenizer.save_pretrained(DIR)), or use a model whose tokenizer has one"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def check_same_vocabulary(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, name: str = "teacher"
) -> None:
    """Token-level distillation compares distributions id by id: the vocabularies must match
    (the same token at the same id). The error lists a few differing tokens."""
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    if ours == theirs:
        return
    only_student = sorted(set(ours) - set(theirs))
    only_teacher = sorted(set(theirs) - set(ours))
    moved = sorted(t for t in set(ours) & set(theirs) if ours[t] != theirs[t])
    parts = [
        f"{len(tokens)} {what}" + (f" (e.g. {', '.join(map(repr, tokens[:3]))})" if tokens else "")
        for what, tokens in (
            ("tokens only in the student's", only_student),
            ("only in the teacher's", only_teacher),
            ("at different ids", moved),
        )
    ]
    raise SetupError(
        f"teacher {name!r} and the student have different tokenizers ({'; '.join(parts)}); "
        "token-level distillation needs one vocabulary: use a teacher of the student's "
        "model family (the same tokenizer)"
    )


def render_chat(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None) -> str:
    """`prompt` as the user turn of the tokenizer's chat template, ready for the reply."""
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_same_chat_template(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    name: str,
    system: str | None,
) -> None:
    """With the chat template on, the teacher scores the student's prompt ids: a teacher
    whose own template renders a conversation differently would be scored out of format."""
    if not getattr(teacher, "chat_template", None):
        return  # a base teacher: no format of its own to disagree with
    probe = "Is this prompt rendered alike?"
    ours, theirs = render_chat(student, probe, system), render_chat(teacher, probe, system)
    if ours != theirs:
        raise SetupError(
            f"teacher {name!r} and the student render the chat template differently "
            f"(student {ours[:80]!r}..., teacher {theirs[:80]!r}...); the teacher would score "
            "prompts in the student's format: give both the same chat template (copy the "
            "student's chat_template.jinja into the teacher's folder), or set "
            "data.chat_template=off"
        )


def sequence_inputs(batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, position_ids) of prompt ⧺ response. [B,P+T] each."""
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return input_ids, attention_mask, position_ids


def response_logits(model: torch.nn.Module, batch: RolloutBatch) -> Tensor:
    """Logits that predict each response token, from one forward over prompt ⧺ response.
    [B,T,V]; position t predicts response_ids[:, t]."""
    input_ids, attention_mask, position_ids = sequence_inputs(batch)
    device = next(model.parameters()).device
    width = batch.response_ids.shape[1]
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
        logits_to_keep=width + 1,  # the prompt's own logits ([B,P,V]) are never computed
    )
    return out.logits[:, -(width + 1) : -1]


def vocab_size(model: PreTrainedModel) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
