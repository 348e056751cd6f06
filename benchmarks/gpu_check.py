"""The measuring half of benchmarks/gpu_check.sh: rollout tokens/s (vLLM vs the HF sampler),
full and LoRA weight-sync seconds, log-prob parity after each sync, and one training step,
on a randomly initialised model of Qwen2.5-0.5B's shape (24 layers x 896, 14 heads, 2 KV
heads, MLP 4864, 151936-row vocabulary; ~494 M parameters) — no hub access.

    python benchmarks/gpu_check.py run             # on a CUDA GPU: every stage, then the files
    python benchmarks/gpu_check.py run --cpu       # the same code on CPU with a tiny model
    python benchmarks/gpu_check.py run --dry-run   # print the plan; import nothing heavy

Each stage runs in its own subprocess (a vLLM engine per process, a crash or hang is that
stage's failure, with a timeout) and prints one JSON line. The summary is written to
benchmarks/results/gpu/gpu_check.{json,md}; the exit code is 1 when any stage failed or a
check did not hold (parity past --atol, a gpu test that failed or was skipped).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
# (layers, hidden, heads, KV heads, MLP, vocabulary rows)
SHAPES = {"qwen2.5-0.5b": (24, 896, 14, 2, 4864, 151936), "tiny": (2, 64, 2, 1, 128, 64)}
STAGES = ("build", "hf_rollout", "vllm_rollout", "vllm_lora", "step")
VLLM_STAGES = ("vllm_rollout", "vllm_lora")


def parameters(shape: tuple[int, ...]) -> int:
    """Parameters of a Qwen2 model of `shape` with tied embeddings (q/k/v carry biases)."""
    layers, hidden, heads, kv_heads, mlp, vocab = shape
    kv = hidden // heads * kv_heads
    attention = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden
    layer = attention + 3 * hidden * mlp + 2 * hidden
    return vocab * hidden + layers * layer + hidden


# -- models ---------------------------------------------------------------------------------
def build_models(shape: tuple[int, ...], root: Path, dtype: str) -> dict[str, str]:
    """`student` and a differently seeded `synced` model (the weights every sync sends),
    with the built-in character tokenizer's ids padded by filler tokens to the vocabulary."""
    import torch

    from protege.modeling import DTYPES
    from protege.tasks.tiny_models import build_tiny_model, tiny_config

    layers, hidden, heads, kv_heads, mlp, vocab = shape
    tokenizer = filled_tokenizer(vocab)
    paths = {}
    for name, seed in (("student", 1), ("synced", 2)):
        config = tiny_config(layers, hidden, heads, kv_heads, mlp, vocab_size=vocab)
        config.max_position_embeddings = 256
        model = build_tiny_model(config, seed).to(DTYPES[dtype])
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return paths


def filled_tokenizer(vocab: int):
    """The character tokenizer with `<fill_i>` entries up to `vocab` ids: random weights sample
    every id, and each must decode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from protege.tasks import tiny_models as tm

    tokens = [*tm.SPECIAL_TOKENS, *tm.CHARS]
    tokens += [f"<fill_{i}>" for i in range(vocab - len(tokens))]
    backend = Tokenizer(
        models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=tm.UNK)
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(tm.SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=tm.PAD, eos_token=tm.EOS, bos_token=tm.BOS,
        unk_token=tm.UNK, model_max_length=256,
    )  # fmt: skip


# -- measurements ---------------------------------------------------------------------------
def prompt_batch(count: int):
    from protege.modeling import load_tokenizer
    from protege.records import PromptBatch
    from protege.tasks.tiny import make_rows, tokenizer_path

    tokenizer = load_tokenizer(tokenizer_path())  # the same ids as the filled tokenizer's
    texts = [row["prompt"] for row in make_rows(count, seed=5)]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return PromptBatch(encoded["input_ids"], encoded["attention_mask"].bool())


def tokens_per_second(sampler, batch, plan) -> float:
    sampler.generate(batch, plan)  # warm-up (CUDA graphs, allocator)
    started = time.perf_counter()
    out = sampler.generate(batch, plan)
    return float(out.response_mask.sum()) / (time.perf_counter() - started)


def sync_seconds(sampler, make_update, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        update = make_update(sampler.version + 1)
        started = time.perf_counter()
        sampler.load_weights(update)
        _synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def logprob_gap(sampler, reference, batch, plan) -> dict[str, float]:
    """Max and mean |log q_sampler(y_t) - log q_HF(y_t)| over what the sampler just drew,
    `reference` being the HF model holding the weights the sampler was synced to."""
    import torch

    from protege.modeling import response_logits

    out = sampler.generate(batch, plan)
    with torch.no_grad():
        logits = response_logits(reference, out).float().cpu()
    ref = torch.log_softmax(logits, -1).gather(-1, out.response_ids.unsqueeze(-1)).squeeze(-1)
    gap = (out.student_logprobs - ref)[out.response_mask].abs()
    return {"max": float(gap.max()), "mean": float(gap.mean()), "tokens": int(gap.numel())}


def random_adapter(peft_model, seed: int) -> dict:
    """The adapter's state dict with B != 0 (a fresh adapter is the identity, so a sync of
    it would prove nothing), written into `peft_model` as well."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    adapter = {
        name: (torch.randn(t.shape, generator=generator) * 0.02).to(t.dtype)
        for name, t in get_peft_model_state_dict(peft_model).items()
    }
    set_peft_model_state_dict(peft_model, adapter)
    return adapter


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(sampler, device: str):
    """protege's HF sampler loads on the CPU (its role on CPU clusters); the comparison with
    vLLM runs it on the GPU: its model, EOS ids and generator move there."""
    import torch

    sampler.student.to(device)
    sampler.eos_ids = sampler.eos_ids.to(device)
    sampler.generator = torch.Generator(device=device)
    return sampler


def stage_hf_rollout(paths: dict[str, str], args) -> dict:
    from protege.actors.sampler import HFSampler
    from protege.config import LoraConfig, RolloutConfig
    from protege.modeling import load_model
    from protege.records import RolloutPlan, WeightUpdate

    rollout = RolloutConfig(max_new_tokens=args.max_new_tokens)
    plan = RolloutPlan(samples_per_prompt=args.samples, teacher_need="none")
    batch = prompt_batch(args.prompts)
    synced = load_model(paths["synced"], args.dtype).to(_device()).eval()
    sampler = _on_device(HFSampler(paths["student"], rollout, dtype=args.dtype), _device())
    row = {"hf_tokens_per_s": tokens_per_second(sampler, batch, plan)}
    state = synced.state_dict()
    row["hf_sync_full_s"] = sync_seconds(sampler, lambda v: WeightUpdate(v, state), args.repeats)
    row["hf_parity_full"] = logprob_gap(sampler, synced, batch, plan)
    del sampler
    lora = LoraConfig(enabled=True, r=8, alpha=16.0)
    sampler = HFSampler(paths["student"], rollout, dtype=args.dtype, lora=lora)
    sampler = _on_device(sampler, _device())
    reference = lora_reference(paths["student"], lora, args.dtype)
    adapter = random_adapter(reference, seed=3)
    update = lambda v: WeightUpdate(v, adapter, lora_only=True)
    row["hf_sync_lora_s"] = sync_seconds(sampler, update, args.repeats)
    row["hf_parity_lora"] = logprob_gap(sampler, reference, batch, plan)
    return row


def lora_reference(path: str, lora, dtype: str):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from protege.modeling import load_model

    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)
    )
    return get_peft_model(load_model(path, dtype), config).to(_device()).eval()


def stage_vllm_rollout(paths: dict[str, str], args) -> dict:
    from protege.actors.vllm_sampler import VLLMSampler
    from protege.config import RolloutConfig
    from protege.modeling import load_model
    from protege.records import RolloutPlan, WeightUpdate

    rollout = RolloutConfig(
        backend="vllm", max_new_tokens=args.max_new_tokens, gpu_memory_utilization=0.3
    )
    plan = RolloutPlan(samples_per_prompt=args.samples, teacher_need="none")
    batch = prompt_batch(args.prompts)
    sampler = VLLMSampler(paths["student"], rollout, dtype=args.dtype, seed=0)
    row = {"vllm_tokens_per_s": tokens_per_second(sampler, batch, plan)}
    synced = load_model(paths["synced"], args.dtype)
    state = synced.state_dict()
    row["vllm_sync_full_s"] = sync_seconds(sampler, lambda v: WeightUpdate(v, state), args.repeats)
    row["vllm_parity_full"] = logprob_gap(sampler, synced.to(_device()).eval(), batch, plan)
    return row


def stage_vllm_lora(paths: dict[str, str], args) -> dict:
    from protege.actors.vllm_sampler import VLLMSampler
    from protege.config import LoraConfig, RolloutConfig
    from protege.records import RolloutPlan, WeightUpdate

    lora = LoraConfig(enabled=True, r=8, alpha=16.0)
    rollout = RolloutConfig(
        backend="vllm", max_new_tokens=args.max_new_tokens, gpu_memory_utilization=0.3
    )
    plan = RolloutPlan(samples_per_prompt=args.samples, teacher_need="none")
    batch = prompt_batch(args.prompts)
    sampler = VLLMSampler(paths["student"], rollout, dtype=args.dtype, seed=0, lora=lora)
    reference = lora_reference(paths["student"], lora, args.dtype)
    adapter = random_adapter(reference, seed=3)
    update = lambda v: WeightUpdate(v, adapter, lora_only=True)
    row = {"vllm_sync_lora_s": sync_seconds(sampler, update, args.repeats)}
    row["vllm_parity_lora"] = logprob_gap(sampler, reference, batch, plan)
    return row


def stage_step(paths: dict[str, str], args) -> dict:
    """Three GKD steps of the protege CLI (student <- synced as teacher), float32 weights
    (bf16 mixed precision in the learner on a GPU); the step time is the median of the
    steps after the first (which pays for warm-up)."""
    output = Path(args.work) / "step_run"
    gpu = _device() == "cuda"
    overrides = [
        f"student.model={paths['student']}", f"teacher.model={paths['synced']}",
        "algorithm.lmbda=1.0", "trainer.steps=3", "trainer.batch_size=8",
        "data.train=builtin:tiny/train", "data.test=null",
        f"rollout.max_new_tokens={args.max_new_tokens}", "logging.wandb=disabled",
        "logging.progress=false", f"output_dir={output}", "trainer.overwrite=true",
    ]  # fmt: skip
    if gpu:  # vLLM rollouts and the learner share the GPU, each in its own Ray actor
        overrides += [
            # (the HF teacher scorer runs on the CPU whatever teacher.num_gpus says)
            "rollout.backend=vllm", "rollout.num_gpus=0.4", "rollout.gpu_memory_utilization=0.3",
            "learner.num_gpus=0.5", "learner.precision=bf16",
        ]  # fmt: skip
    else:
        overrides += ["trainer.workers=local", "learner.lr=1e-3"]
    command = [sys.executable, str(ROOT / "examples" / "gkd.py"), *overrides]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=args.stage_timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if row.get("step", -1) >= 0 and "time/step" in row]
    return {
        "step_s": statistics.median(row["time/step"] for row in steps[1:]),
        "step_phases_s": {k: v for k, v in steps[-1].items() if k.startswith("time/")},
        "step_command": " ".join(command[1:]),
    }


STAGE_FUNCTIONS = {
    "hf_rollout": stage_hf_rollout,
    "vllm_rollout": stage_vllm_rollout,
    "vllm_lora": stage_vllm_lora,
    "step": stage_step,
}


# -- orchestration --------------------------------------------------------------------------
def run_stage(name: str, args) -> dict:
    """One stage in a fresh interpreter: {"ok": true, ...its numbers} or {"ok": false,
    "error": ...}."""
    command = [sys.executable, __file__, "stage", name, *_forwarded(args)]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=args.stage_timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.stage_timeout} s"}
    result = {"ok": False, "error": f"exit {done.returncode}: {done.stderr[-3000:]}"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    result["seconds"] = time.perf_counter() - started
    print(f"[gpu_check] {name}: {json.dumps(result)[:400]}", file=sys.stderr, flush=True)
    return result


def _forwarded(args) -> list[str]:
    flags = ["--work", args.work, "--dtype", args.dtype, "--shape", args.shape]
    for name in ("prompts", "samples", "max_new_tokens", "repeats", "stage_timeout"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def stage_main(name: str, args) -> None:
    """`gpu_check.py stage NAME`: one JSON line on stdout."""
    import torch

    torch.manual_seed(0)
    paths_file = Path(args.work) / "paths.json"
    try:
        if name == "build":
            paths = build_models(SHAPES[args.shape], Path(args.work), args.dtype)
            paths_file.write_text(json.dumps(paths))
            result = {"paths": paths, "parameters": parameters(SHAPES[args.shape])}
        else:
            result = STAGE_FUNCTIONS[name](json.loads(paths_file.read_text()), args)
        result["ok"] = True
    except Exception as error:  # noqa: BLE001 -- a stage failing is a row of the report
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"[-3000:]}
    gc.collect()
    print(json.dumps(result), flush=True)


def checks(stages: dict[str, dict], tests: dict | None, args) -> list[str]:
    """What did not hold, one line each (empty: the check passed)."""
    failed = [
        f"stage {name} failed: {result.get('error', '')[:500]}"
        for name, result in stages.items()
        if not result.get("ok") and not result.get("skipped")
    ]
    for result in stages.values():
        for key, gap in result.items():
            if key.endswith(("parity_full", "parity_lora")) and gap["max"] > args.atol:
                failed.append(
                    f"{key}: log-probs after the sync differ from HF's by up to {gap['max']:.2e} "
                    f"(mean {gap['mean']:.2e}) > --atol {args.atol:g} ({args.dtype})"
                )
    if tests is not None:
        if tests["failures"] or tests["errors"]:
            failed.append(f"gpu tests: {tests['failures']} failed, {tests['errors']} errors")
        if tests["skipped"]:
            failed.append(f"gpu tests: {tests['skipped']} skipped on a GPU machine (not checked)")
        if not tests["tests"]:
            failed.append("gpu tests: none ran")
    return failed


def junit_summary(path: str | None) -> dict | None:
    if not path:
        return None
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    summary = {key: int(suite.get(key, 0)) for key in keys}
    summary["cases"] = [
        {
            "name": f"{case.get('classname')}::{case.get('name')}",
            "outcome": next((child.tag for child in case), "passed"),
        }
        for case in suite.iter("testcase")
    ]
    return summary


def markdown(report: dict) -> str:
    stages, meta = report["stages"], report["meta"]
    hf, vllm, lora, step = (stages.get(k, {}) for k in STAGES[1:])

    def number(row: dict, key: str, form: str = ".3f") -> str:
        return format(row[key], form) if key in row else "—"

    def gap(row: dict, key: str) -> str:
        return f"{row[key]['max']:.1e} / {row[key]['mean']:.1e}" if key in row else "—"

    lines = [
        "# GPU check",
        "",
        (
            f"{meta['date']}, {meta['device']}, `{meta['command']}`: a random model of shape "
            f"{meta['shape']} ({meta['parameters'] / 1e6:.2f} M parameters), {meta['dtype']}, "
            f"{meta['prompts']} prompts x {meta['samples']} samples, {meta['max_new_tokens']} new "
            "tokens."
        ),
        "",
        "| measure | HF sampler | vLLM sampler |",
        "| --- | --- | --- |",
        (
            f"| rollout tokens/s | {number(hf, 'hf_tokens_per_s', '.0f')} "
            f"| {number(vllm, 'vllm_tokens_per_s', '.0f')} |"
        ),
        (
            f"| full weight sync (s) | {number(hf, 'hf_sync_full_s')} "
            f"| {number(vllm, 'vllm_sync_full_s')} |"
        ),
        (
            f"| LoRA weight sync (s) | {number(hf, 'hf_sync_lora_s')} "
            f"| {number(lora, 'vllm_sync_lora_s')} |"
        ),
        (
            f"| log-prob gap after full sync, max / mean | {gap(hf, 'hf_parity_full')} "
            f"| {gap(vllm, 'vllm_parity_full')} |"
        ),
        (
            f"| log-prob gap after LoRA sync, max / mean | {gap(hf, 'hf_parity_lora')} "
            f"| {gap(lora, 'vllm_parity_lora')} |"
        ),
        "",
        f"One GKD step (batch 8, median of steps 2-3): {number(step, 'step_s')} s.",
        "",
    ]
    tests = report.get("gpu_tests")
    if tests:
        lines += [(f"gpu-marked tests: {tests['tests']} run, {tests['failures']} failed, "
                  f"{tests['errors']} errors, {tests['skipped']} skipped."), ""]  # fmt: skip
    verdict = report["failed"]
    lines += ["**PASSED**"] if not verdict else ["**FAILED**", "", *[f"- {f}" for f in verdict]]
    return "\n".join(lines) + "\n"


def dry_run(args) -> None:
    shape = SHAPES[args.shape]
    print(f"gpu_check plan: shape {args.shape} {shape} = {parameters(shape) / 1e6:.1f} M "
          f"parameters, {args.dtype}; stages {', '.join(STAGES)}; parity --atol {args.atol:g}; "
          f"results to {args.results}/gpu_check.{{json,md}}")  # fmt: skip


def run_main(args) -> int:
    if args.dry_run:
        dry_run(args)
        return 0
    import torch  # only here: --dry-run must stay instant

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); --cpu runs the "
              "CPU smoke of this script", file=sys.stderr)  # fmt: skip
        return 2
    try:
        import vllm  # noqa: F401

        has_vllm = True
    except Exception:  # noqa: BLE001 -- absent, or broken on this machine
        has_vllm = False
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        for name in STAGES:
            if name in VLLM_STAGES and args.cpu and not has_vllm:
                stages[name] = {"ok": False, "skipped": "vllm is not importable (CPU smoke)"}
                continue
            stages[name] = run_stage(name, args)
            if name == "build" and not stages[name]["ok"]:
                break
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "shape": args.shape,
        "parameters": parameters(SHAPES[args.shape]), "dtype": args.dtype,
        "prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
        "command": "bash benchmarks/gpu_check.sh" if args.junit else " ".join(sys.argv),
    }  # fmt: skip
    tests = junit_summary(args.junit)
    report = {"meta": meta, "stages": stages, "gpu_tests": tests}
    report["failed"] = checks(stages, tests, args)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    if report["failed"]:
        print("GPU CHECK FAILED:\n  " + "\n  ".join(report["failed"]), file=sys.stderr)
        return 1
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["run", "stage"])
    parser.add_argument("stage", nargs="?", choices=STAGES)
    parser.add_argument("--cpu", action="store_true", help="CPU smoke: tiny shape, float32")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    parser.add_argument("--atol", type=float, default=1e-3, help="log-prob parity tolerance")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage-timeout", type=int, default=420)
    parser.add_argument("--junit", default=None, help="pytest junit XML of the gpu tests")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--work", default="")
    args = parser.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.cpu else "qwen2.5-0.5b")
    args.dtype = args.dtype or ("float32" if args.cpu else "bfloat16")
    if args.cpu:
        args.prompts, args.samples, args.max_new_tokens, args.repeats = 4, 2, 6, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.mode == "stage":
        stage_main(args.stage, args)
        return 0
    return run_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
