"""A second tokenizer for the built-in task: byte-pair merges learnt on the task's text.

The shipped pair is character-level; a teacher with this tokenizer reads "18" or "+1" as
one token, under other ids and another EOS ("</s>"), so it exercises cross-tokenizer
distillation (`protege.xtok`) on the same task. The teacher is a Llama model (another family
than the Qwen2 student): transformers 5 loads the tokenizer of a `qwen2` model directory as
`Qwen2Tokenizer`, whose pre-tokenizer splits every digit, not as it was saved.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from protege.tasks.tiny_models import MAX_POSITIONS, TEACHER_SHAPE, build_tiny_model

BPE_PAD, BPE_EOS, BPE_BOS, BPE_UNK = "<pad>", "</s>", "<s>", "<unk>"
BPE_SPECIAL_TOKENS = (BPE_UNK, BPE_PAD, BPE_BOS, BPE_EOS)  # ids 0..3: not the student's order
BPE_VOCAB_SIZE = 64  # 4 special + 12 task symbols + 48 merges


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE):
    """A BPE tokenizer trained on `texts` (prompts and answers, each on its own), with no
    pre-tokenizer, so merges may cross "+" and "=" ("+1", "=1"); decoding fuses tokens."""
    backend = Tokenizer(models.BPE(unk_token=BPE_UNK))
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=BPE_PAD,
        eos_token=BPE_EOS,
        bos_token=BPE_BOS,
        unk_token=BPE_UNK,
        model_max_length=MAX_POSITIONS,
    )


def bpe_teacher_config(tokenizer, shape: tuple[int, ...] = TEACHER_SHAPE) -> LlamaConfig:
    """A Llama config of the tiny teacher's shape (layers, hidden, heads, key/value heads,
    MLP width) over `tokenizer`'s ids."""
    layers, hidden, heads, kv_heads, intermediate = shape
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def build_bpe_teacher(
    tokenizer, seed: int, shape: tuple[int, ...] = TEACHER_SHAPE
) -> LlamaForCausalLM:
    """An untrained Llama teacher over `tokenizer`, its weights depending only on `seed`."""
    return build_tiny_model(bpe_teacher_config(tokenizer, shape), seed)
