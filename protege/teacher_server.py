"""A teacher behind an OpenAI-compatible inference server (`teacher.backend: server`).

The HTTP side, shared by the driver's start-up check and the scorer actor: `ServerClient`
(requests with a timeout, retries with exponential backoff on connection errors, timeouts
and 5xx, one `TeacherServerError` when the server stops answering) and `check_server`, run
once before training: the server answers, serves `teacher.model`, tokenizes as the student
does, fits the longest sequence and returns as many log-probs per position as the plan
asks for. Scoring itself is `protege.actors.server_teacher`. The protocol is vLLM's
(`vllm serve`): `/v1/models`, `/tokenize`, and `/v1/completions` with `prompt_logprobs`.
httpx is imported inside the client, so the driver reads this module for free.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protege.errors import ProtegeError

if TYPE_CHECKING:
    from protege.config import Config, TeacherConfig

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})  # a busy or restarting server
BACKOFF_S = 0.5  # first wait between attempts; doubled after each failed attempt
PROBE_CHARS = 4096  # characters of the student's vocabulary sent to /tokenize at start-up
# JSON has no -inf: vLLM's server writes a log-prob of -inf as this value (clamp_prompt_logprobs)
SERVER_NEG_INF = -9999.0
START_HINT = (
    "start it with `vllm serve MODEL --served-model-name NAME --max-logprobs -1`, or fix "
    "teacher.url"
)


class TeacherServerError(ProtegeError):
    """The teacher's server is unreachable, stopped answering, or refused a request."""


@dataclass(frozen=True)
class ServerLimits:
    """How the client talks to the server: per-request timeout, retries, requests in flight."""

    timeout_s: float = 60.0
    retries: int = 3
    concurrency: int = 4
    backoff_s: float = BACKOFF_S


class ServerClient:
    """JSON over HTTP to one server, safe to share between threads (httpx's pool)."""

    def __init__(self, url: str, name: str, limits: ServerLimits | None = None) -> None:
        import httpx

        limits = limits or ServerLimits()
        # The OpenAI convention writes base URLs with /v1; the routes below are spelled whole.
        self.url, self.name, self.limits = url.rstrip("/").removesuffix("/v1"), name, limits
        pool = httpx.Limits(max_connections=limits.concurrency)
        self._http = httpx.Client(base_url=self.url, timeout=limits.timeout_s, limits=pool)
        self.retried = 0  # failed attempts that were retried, for the scorer's metrics

    def get(self, path: str) -> Any:
        return self._request("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, body)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        """The JSON answer; retried with exponential backoff on connection errors, timeouts
        and RETRY_STATUSES; a 4xx answer (a bad request: retrying cannot help) or the last
        failure raises TeacherServerError."""
        import httpx

        attempts = self.limits.retries + 1
        for attempt in range(attempts):
            if attempt:
                self.retried += 1
                time.sleep(self.limits.backoff_s * 2 ** (attempt - 1))
            try:
                answer = self._http.request(method, path, json=body)
            except httpx.TransportError as error:  # refused, reset, timed out, bad framing
                failure = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                continue
            if answer.status_code in RETRY_STATUSES:
                failure = f"HTTP {answer.status_code}: {server_message(answer)}"
                continue
            if answer.status_code >= 400:
                raise TeacherServerError(
                    f"teacher {self.name!r}: the server at {self.url} refused {method} {path} "
                    f"(HTTP {answer.status_code}): {server_message(answer)}"
                )
            try:
                return answer.json()
            except ValueError:
                failure = f"an answer that is not JSON ({answer.text[:80]!r})"
        raise TeacherServerError(
            f"teacher {self.name!r}: the server at {self.url} did not answer {method} {path} "
            f"after {attempts} attempts (last: {failure}); check that it is running and "
            "reachable from every node, or raise teacher.timeout_s / teacher.retries"
        )


def server_message(answer: Any) -> str:
    """The error text of a server's answer (vLLM: {"error": {"message": ...}}), else its body."""
    try:
        error = answer.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return answer.text[:200] or answer.reason_phrase


def limits_for(spec: TeacherConfig) -> ServerLimits:
    return ServerLimits(spec.timeout_s, spec.retries, spec.concurrency)


def client_for(spec: TeacherConfig) -> ServerClient:
    return ServerClient(spec.url or "", spec.name, limits_for(spec))


def completion_request(model: str, sequences: list[list[int]], logprobs: int) -> dict[str, Any]:
    """One batched scoring request: the token ids are the prompt (nothing is re-tokenised),
    at temperature 1, `logprobs` top candidates per prompt position (0: only the scored
    token; -1: the whole vocabulary). vLLM generates at least one token, discarded here."""
    return {
        "model": model,
        "prompt": sequences,
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": logprobs,
    }


def logprob_width(client: ServerClient, model: str, topk: int) -> tuple[int, int | None]:
    """(K, V): top-k candidates per position the server returns for `topk` (min(topk, V),
    as the in-process teachers) and its vocabulary size V, or None where the server's
    --max-logprobs is below V (then K = topk < V). One probe of a 2-token sequence."""
    try:
        answer = client.post("/v1/completions", completion_request(model, [[0, 0]], -1))
        vocab = len(answer["choices"][0]["prompt_logprobs"][1])
    except TeacherServerError as error:
        if "prompt_logprobs" not in str(error):
            raise
        vocab = None  # the whole vocabulary is over the server's --max-logprobs
    if topk < 1:
        return 0, vocab
    if vocab is not None:
        return min(topk, vocab), vocab
    try:
        client.post("/v1/completions", completion_request(model, [[0, 0]], topk))
    except TeacherServerError as error:
        if "prompt_logprobs" not in str(error):
            raise
        raise TeacherServerError(
            f"teacher {client.name!r}: the server at {client.url} returns fewer log-probs per "
            f"position than algorithm.topk={topk} ({server_message_of(error)}); restart it with "
            f"--max-logprobs {topk} (or -1), or lower algorithm.topk"
        ) from None
    return topk, None


def server_message_of(error: TeacherServerError) -> str:
    return str(error).rsplit("): ", 1)[-1]


def check_teacher_servers(
    config: Config, algorithm: Any, tokenizer: Any, longest_prompt: int
) -> None:
    """`check_server` for every teacher on a server, once the prompts are read; prints the
    line each check returns."""
    servers = [spec for spec in config.teachers if spec.on_server]
    if not servers:
        return
    from protege.algorithms.registry import distinct_plans
    from protege.modeling import load_model_config

    plans = distinct_plans(algorithm, max(config.trainer.steps, 1))
    topk = max((p.topk for p in plans if p.teacher_need == "topk"), default=0)
    width = load_model_config(config.student.model).vocab_size
    longest = longest_prompt + config.rollout.max_new_tokens
    for spec in servers:
        log(check_server(spec, tokenizer, longest, topk, width))


def check_server(
    spec: TeacherConfig, tokenizer: Any, longest: int, topk: int, student_width: int
) -> str:
    """Refuse, before any worker starts, a server that cannot score for this run: it does not
    answer, does not serve `spec.model`, tokenizes otherwise than the student, cannot hold
    the longest prompt plus response, or returns fewer log-probs than `topk`. Returns the
    line the run prints about it."""
    client = client_for(spec)
    try:
        models = client.get("/v1/models").get("data") or []
    except TeacherServerError as error:
        raise TeacherServerError(
            f"teacher {spec.name!r} (teacher.backend=server): no OpenAI-compatible server "
            f"answers at {spec.url}: {error}. {START_HINT}"
        ) from None
    entry = served_entry(spec, models)
    limit = entry.get("max_model_len")
    if isinstance(limit, int) and longest + 1 > limit:  # +1: the one token vLLM generates
        raise TeacherServerError(
            f"teacher {spec.name!r}: the server at {spec.url} holds {limit} tokens per sequence "
            f"(max_model_len), but the longest prompt plus rollout.max_new_tokens is {longest} "
            "tokens (+1 it generates); serve it with a larger --max-model-len, or lower "
            "rollout.max_new_tokens or data.max_prompt_tokens"
        )
    check_tokenizer(client, spec, tokenizer)
    k, vocab = logprob_width(client, spec.model, topk)
    check_vocabulary(spec, vocab, len(tokenizer), student_width if topk else None)
    client.close()
    width = f"{vocab} ids" if vocab is not None else "over its --max-logprobs"
    return (
        f"teacher {spec.name!r}: {spec.model!r} served at {spec.url} (max_model_len {limit}, "
        f"vocabulary {width}{f', top-{k}' if k else ''}); its tokenizer agrees with the student's"
    )


def served_entry(spec: TeacherConfig, models: list[dict[str, Any]]) -> dict[str, Any]:
    for entry in models:
        if entry.get("id") == spec.model:
            return entry
    names = [entry.get("id") for entry in models]
    raise TeacherServerError(
        f"teacher {spec.name!r}: teacher.model={spec.model!r} is not served at {spec.url}; it "
        f"serves {names} (set teacher.model to the served model name, vLLM's "
        "--served-model-name, or the path it was started with)"
    )


def probe_text(tokenizer: Any) -> str:
    """Text decoded from ids spread over the whole vocabulary (specials left out), so a
    tokenizer that orders or merges tokens otherwise encodes it to other ids."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    step = max(1, len(ids) // 1024)
    return tokenizer.decode(ids[::step])[:PROBE_CHARS]


def check_tokenizer(client: ServerClient, spec: TeacherConfig, tokenizer: Any) -> None:
    """Token ids go to the server as they are: its tokenizer must encode text as the
    student's does (the server's /tokenize on a probe from the student's vocabulary)."""
    text = probe_text(tokenizer)
    body = {"model": spec.model, "prompt": text, "add_special_tokens": False}
    try:
        theirs = client.post("/tokenize", body)["tokens"]
    except TeacherServerError as error:
        raise TeacherServerError(
            f"{error}; protege checks the server's tokenizer against the student's through "
            "/tokenize (start the server with its tokenizer, without --skip-tokenizer-init)"
        ) from None
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    if theirs == ours:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
    )
    raise TeacherServerError(
        f"teacher {spec.name!r}: the server at {spec.url} tokenizes otherwise than the student "
        f"(a probe text of {len(ours)} student tokens: {len(theirs)} server tokens, the first "
        f"difference at token {at}: student {ours[at : at + 3]} vs server {theirs[at : at + 3]}); "
        "token-level distillation needs one vocabulary: serve a model of the student's family"
    )


def check_vocabulary(
    spec: TeacherConfig, vocab: int | None, tokens: int, student_width: int | None
) -> None:
    """The served model scores every id the student's tokenizer emits, and (top-k runs) names
    no id the student has no logit for."""
    if vocab is None:
        return
    if vocab < tokens:
        raise TeacherServerError(
            f"teacher {spec.name!r}: the served model scores {vocab} token ids, but the "
            f"student's tokenizer has {tokens}; serve a model with the student's vocabulary"
        )
    if student_width is not None and vocab > student_width:
        raise TeacherServerError(
            f"teacher {spec.name!r}: the served model's top-k may name any of {vocab} ids, but "
            f"the student has logits for {student_width}; use an algorithm that reads sampled "
            "log-probs only (opd, minillm), or a student with the teacher's vocabulary width"
        )


def log(line: str) -> None:
    print(f"[protege] {line}", file=sys.stderr, flush=True)
