"""Which rows carry the learned router's signal (protege.router), on the tiny task.

The initial student answers the first N shipped multi-teacher training prompts once each
(sampling at temperature 1, up to 6 tokens). Both specialists score the sampled response
(ℓ_i = Σ_t log p_i(y_t)). Per group (rewarded by exact match or not, x the row's teacher
field): the rows, and the share where the likelihood points at the row's own specialist.
A rewarded row points right when its specialist explains it best. A wrong answer points
right when its specialist explains it worst, which is what an advantage weight
(reward − mean) would need.

    python benchmarks/router_signal.py          # 400 prompts, seed 0
Writes benchmarks/results/router_signal.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def sampled(student, tokenizer, prompt: str, eos: int):
    """(prompt ids [P], response ids up to and with EOS [T], the response's text)."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = student.generate(
            ids, do_sample=True, max_new_tokens=6, eos_token_id=eos, pad_token_id=eos, top_k=0
        )
    response = out[0, ids.shape[1] :]
    ends = (response == eos).nonzero()
    if len(ends):
        response = response[: int(ends[0]) + 1]
    text = tokenizer.decode(response[response != eos])
    return ids[0], response, text


def likelihood(model, prompt, response) -> float:
    import torch

    sequence = torch.cat([prompt, response]).unsqueeze(0)
    with torch.no_grad():
        logits = model(sequence).logits[0, len(prompt) - 1 : -1]
    return float(torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).sum())


def measure(rows: list[dict]) -> dict:
    from protege.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny/student")
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    student = load_model("builtin:tiny/student", "float32")
    teachers = [load_model(f"builtin:tiny/multi_teacher/{h}", "float32") for h in ("low", "high")]
    groups: dict[str, list[int]] = {}
    for row in rows:
        prompt, response, text = sampled(student, tokenizer, row["prompt"], eos)
        scores = [likelihood(t, prompt, response) for t in teachers]
        own = 0 if row["teacher"] == "low" else 1
        rewarded = text.strip() == row["answer"]
        right = scores[own] > scores[1 - own] if rewarded else scores[own] < scores[1 - own]
        key = f"{'rewarded' if rewarded else 'wrong'} {row['teacher']}"
        groups.setdefault(key, []).append(int(right))
    return {key: {"rows": len(v), "points_right": sum(v) / len(v)} for key, v in groups.items()}


def main() -> None:
    import torch

    from protege.tasks.tiny import multi_teacher_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    path = multi_teacher_path("train.jsonl")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()][: args.rows]
    groups = measure(rows)
    lines = [
        f"# Router signal on the tiny task ({args.rows} prompts, seed {args.seed})",
        "",
        "| rows | count | likelihood points at the row's own specialist |",
        "| --- | --- | --- |",
    ]
    for key in sorted(groups):
        lines.append(f"| {key} | {groups[key]['rows']} | {groups[key]['points_right']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "router_signal.md").write_text(text)
    (RESULTS / "router_signal.json").write_text(json.dumps(groups, indent=2) + "\n")


if __name__ == "__main__":
    main()
