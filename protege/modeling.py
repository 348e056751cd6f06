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

from protege.errors import SetupError
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
        "tiny/student_h32": tiny.student_h32_path,
        "tiny/tokenizer": tiny.tokenizer_path,
        "tiny/train": tiny.train_path,
        "tiny/test": tiny.test_path,
        "tiny/pretrain": tiny.pretrain_path,
        "tiny/osd_draft": tiny.osd_draft_path,
        "tiny/osd_traffic": tiny.osd_traffic_path,
        "tiny/osd_heldout": tiny.osd_heldout_path,
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
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> None:
    """Token-level distillation compares distributions id by id: the vocabularies must match."""
    if student.get_vocab() != teacher.get_vocab():
        only_student = len(set(student.get_vocab()) - set(teacher.get_vocab()))
        only_teacher = len(set(teacher.get_vocab()) - set(student.get_vocab()))
        raise SetupError(
            "teacher and student tokenizers differ "
            f"({only_student} tokens only in the student's, {only_teacher} only in the teacher's); "
            "token-level distillation needs one vocabulary: use a teacher of the student's "
            "model family (the same tokenizer)"
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
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
    )
    prompt_len = batch.prompt_ids.shape[1]
    return out.logits[:, prompt_len - 1 : -1]


def vocab_size(model: PreTrainedModel) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
