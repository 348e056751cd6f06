"""Tokenizer and model shapes for the built-in tiny task, built locally (no hub access).

The tokenizer is character-level: every symbol is one token, so tokenising a prompt and
its completion separately gives the same ids as tokenising their concatenation.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)  # ids 0..3, in this order
# The task uses digits, "+" and "="; the other symbols are in the vocabulary so variants of
# the task (and tests) can use them without changing the model shapes.
CHARS = "0123456789" + " +-*/=()<>.,:;?!"
MAX_POSITIONS = 64

# (layers, hidden, attention heads, key/value heads, MLP width) of the shipped pair.
TEACHER_SHAPE = (4, 128, 4, 2, 384)  # ~0.79 M parameters
STUDENT_SHAPE = (2, 64, 4, 2, 128)  # ~76 K parameters


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A ~30-symbol character tokenizer with pad/eos/bos/unk; no special tokens are added
    automatically (callers append EOS to completions, the model never needs a BOS)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without spaces
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )


def tiny_config(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = len(SPECIAL_TOKENS) + len(CHARS),
) -> Qwen2Config:
    """A Qwen2 config sized for the tiny task; ids match `build_char_tokenizer()`."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
    )


def build_tiny_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """An untrained model of `config`'s family (Qwen2 for the tiny task, Llama for the BPE
    teacher) whose initial weights depend only on `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    torch.random.set_rng_state(generator_state)  # do not disturb the caller's RNG stream
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    return model


def teacher_config() -> Qwen2Config:
    return tiny_config(*TEACHER_SHAPE)


def student_config() -> Qwen2Config:
    return tiny_config(*STUDENT_SHAPE)


def build_tiny_models(seed: int = 0) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    """Untrained (teacher, student) with the shipped shapes, seeded `seed` and `seed + 1` so
    the two never start equal."""
    return build_tiny_model(teacher_config(), seed), build_tiny_model(student_config(), seed + 1)
