"""One typed configuration tree: defaults live here and nowhere else.

A run's config is a YAML preset from `configs/` plus `a.b=value` overrides; unknown keys,
wrong types and out-of-range values fail at load time with the dotted key path.
The defaults run the built-in tiny task on CPU (`builtin:tiny/...` paths); they apply only
while the run names no model or data of its own (`protege.tasks.builtin`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from protege.config_text import (  # noqa: F401 - ConfigError and CONFIG_DIR are this module's API too
    CONFIG_DIR,
    ConfigError,
    assign_dotted,
    check_size,
    describe_error,
    parse_override,
    read_preset,
)
from protege.errors import AlgorithmConfigError
from protege.fusion_config import FusionConfig
from protege.tasks.builtin import OwnTaskError, apply_task_defaults

if TYPE_CHECKING:  # the algorithms import torch; `--help` reads this module without it
    from protege.algorithms.registry import Algorithm

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_LR = 3.4e37  # 10·lr must fit in float32 (3.4e38): see LearnerConfig._lr_fits_adamw
SKIP_ALGORITHM = "skip_algorithm"  # validation context key: leave algorithm.* to the caller
SELF_TEACHER = "self"  # teacher.model: the student's base model with the LoRA adapter off


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        """Every float key is a finite number: `learner.lr=.inf` would make every weight inf."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class LoraConfig(Section):
    enabled: bool = False  # train a LoRA adapter instead of every weight
    r: int = Field(8, ge=1)  # adapter rank
    alpha: float = Field(16.0, gt=0)  # adapter scale numerator (scale = alpha / r)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapter's input
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]  # layers adapted
    merge_on_save: bool = True  # final/ holds merged full weights (else the adapter alone)


class StudentConfig(Section):
    model: str = "builtin:tiny/student"  # local HF model directory, or builtin:tiny/...
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights' dtype when loaded
    lora: LoraConfig = LoraConfig()


class TeacherConfig(Section):
    """One teacher client: its model, where it runs and how it is batched."""

    name: str = "teacher"  # unique among `teachers`; metrics and payloads carry it
    model: str = "builtin:tiny/teacher"  # local HF model directory, builtin:..., or "self"
    backend: Literal["hf", "vllm", "server"] = "hf"  # who computes its log-probs
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights' dtype when loaded
    num_workers: int = Field(1, ge=1)  # scorer replicas; rollout shards are dealt over them
    micro_batch_size: int = Field(64, ge=1)  # rows per teacher forward
    num_cpus: float = Field(0.25, ge=0)  # Ray resources of each scorer
    num_gpus: float = Field(0.0, ge=0)  # GPUs of each scorer (fractions colocate roles)
    # K-V outputs (algorithm kv_distill): text read before every sequence (seed 002 phase 1:
    # one model, two prompts), and a disk cache of scored rows (a caching teacher).
    prefix: str = ""
    kv_cache: bool = False  # keep scored K-V rows on disk and reuse them (kv_distill)
    kv_cache_dir: str | None = None  # default: <output_dir>/teacher_kv/<name>
    # Privileged context (protege.privileged): the teacher scores the student's responses
    # after a prompt of its own, the row's field `prompt_field`, or `prompt_template` filled
    # from the row's text fields ("{answer};{prompt}"; plain {field}s only).
    prompt_field: str | None = None  # the row's field holding the teacher's prompt text
    prompt_template: str | None = None  # the teacher's prompt from the row's text fields
    live: bool = False  # model self: the student's current weights (LoRA on), not its base

    # backend=server: an OpenAI-compatible server (`vllm serve`) scores, and `model` is the
    # name it serves the model under (its /v1/models lists it).
    url: str | None = None  # backend=server: the server's address, e.g. http://127.0.0.1:8000
    concurrency: int = Field(4, ge=1)  # backend=server: scoring requests in flight at once
    timeout_s: float = Field(60.0, gt=0)  # backend=server: seconds one request may take
    retries: int = Field(3, ge=0)  # backend=server: retries, with exponential backoff

    weight: float = Field(1.0, ge=0)  # several teachers: its share of the fused target (fusion)

    @model_validator(mode="after")
    def _privileged_view(self) -> TeacherConfig:
        from protege.prompt_views import spec_problem

        problem = spec_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def is_self(self) -> bool:
        """The student's base model is the teacher (LoRA self-distillation)."""
        return self.model == SELF_TEACHER

    @property
    def on_server(self) -> bool:
        """Scored by a server elsewhere: no local model directory, tokenizer or config."""
        return self.backend == "server"


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"  # who samples the student's responses
    num_workers: int = Field(1, ge=1)  # sampler replicas; each step's prompts are sharded
    max_new_tokens: int = Field(8, ge=1)  # longest response, in tokens
    temperature: float = Field(1.0, gt=0)  # sampling temperature
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling mass
    # vLLM backend only: GPU memory share of the engine, and how learner weights reach it
    # (object_store: through Ray's object store, any device; nccl: broadcast from learner
    # rank 0 to the engine's GPU workers).
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    weight_sync: Literal["object_store", "nccl"] = "object_store"  # vLLM: how weights arrive
    num_cpus: float = Field(0.25, ge=0)  # Ray resources of each sampler
    num_gpus: float = Field(0.0, ge=0)  # GPUs of each sampler (fractions colocate roles)
    # The (single, HF) teacher scores each shard inside the sampler that wrote it: one call
    # per shard, no teacher actor, no object-store hop (protege.colocation says what it needs).
    colocate_teacher: bool = False
    # the samplers' weights (the learner keeps student.dtype); null: student.dtype
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class RewardRule(Section):
    name: Literal["exact_match", "numeric_match", "regex", "length_penalty"]  # the rule
    weight: float = 1.0  # its weight in the summed reward
    pattern: str | None = None  # for `regex`
    target_length: int | None = Field(None, ge=0)  # for `length_penalty`


class RewardModel(Section):
    path: str  # local HF sequence-classification model directory (one label)
    weight: float = 1.0  # its weight in the summed reward


class RewardConfig(Section):
    rules: list[RewardRule] = []  # rule functions, each weighted into the reward
    models: list[RewardModel] = []  # reward models, each weighted into the reward
    micro_batch_size: int = Field(64, ge=1)  # reward-model rows per forward
    num_cpus: float = Field(0.25, ge=0)  # Ray resources of the reward worker
    num_gpus: float = Field(0.0, ge=0)  # GPUs of the reward worker

    @property
    def enabled(self) -> bool:
        return bool(self.rules or self.models)


class LearnerConfig(Section):
    num_workers: int = Field(1, ge=1)  # data-parallel ranks
    lr: float = Field(1e-3, gt=0)  # AdamW peak learning rate (tiny models need ~1e-3)
    weight_decay: float = Field(0.0, ge=0)  # AdamW decoupled weight decay
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # decay after warmup
    warmup_steps: int = Field(0, ge=0)  # steps of linear warmup from 0 to lr
    max_grad_norm: float = Field(1.0, gt=0)  # gradients clipped to this global L2 norm
    micro_batch_size: int = Field(64, ge=1)  # rows per forward/backward (gradients accumulate)
    zero_stage: int = Field(0, ge=0, le=3)  # DeepSpeed ZeRO stage (0: plain data parallel)
    precision: Literal["fp32", "bf16"] = (
        "fp32"  # learner precision (bf16: DeepSpeed mixed precision)
    )
    num_cpus: float = Field(0.5, ge=0)  # Ray resources of each rank
    num_gpus: float = Field(0.0, ge=0)  # GPUs of each rank
    # positions per block of the loss's vocabulary-wide divergences (recomputed in the
    # backward, not kept); auto: 2^22 vocabulary entries a block; 0: the whole micro-batch
    loss_chunk_tokens: int | Literal["auto"] = "auto"

    @field_validator("loss_chunk_tokens")
    @classmethod
    def _chunk_not_negative(cls, tokens: int | str) -> int | str:
        if isinstance(tokens, int) and tokens < 0:
            raise ValueError("must be >= 0 or 'auto' (0: no chunking)")
        return tokens

    @field_validator("lr")
    @classmethod
    def _lr_fits_adamw(cls, lr: float) -> float:
        """AdamW's first step size is lr / (1 - β1) = 10·lr, a float32 scalar inside torch:
        from lr = 3.4e37 it overflows there (a RuntimeError mid-run) instead of being a step
        the numerics guard can skip."""
        if lr >= MAX_LR:
            raise ValueError(
                f"must be below {MAX_LR:g}: AdamW's first step, 10·lr, would overflow float32 "
                "(an lr moves each weight by about lr per step; tiny models use ~1e-3, real "
                "ones ~1e-6 to 1e-5)"
            )
        return lr


class DataConfig(Section):
    train: str = "builtin:tiny/train"  # JSONL: prompt, optional completion and answer
    test: str | None = "builtin:tiny/test"  # JSONL with prompt and answer; null: no evaluation
    pretrain: str | None = "builtin:tiny/pretrain"  # text for MiniLLM's LM term; null: off
    # wrap each prompt in the student tokenizer's chat template; auto: when it has one
    chat_template: bool | Literal["auto"] = "auto"
    system_prompt: str | None = None  # a system message before each prompt (chat template on)
    max_prompt_tokens: int = Field(256, ge=1)  # longest prompt, in tokens (after the chat template)
    # a longer prompt: `error` names its file:line, `truncate_left` keeps its last
    # max_prompt_tokens tokens, `drop` skips the row; the run's first line counts them
    overlong: Literal["error", "truncate_left", "drop"] = "error"
    shuffle_seed: int = 0  # order of the rows in each epoch


class TrainerConfig(Section):
    steps: int = Field(100, ge=0)  # training steps (updates of the student)
    batch_size: int = Field(32, ge=1)  # prompts per step
    seed: int = 0  # seeds the samplers (one per replica), LoRA and module init
    eval_every: int = Field(0, ge=0)  # 0: only before and after training
    eval_size: int = Field(200, ge=1)  # test prompts evaluated (the first ones of data.test)
    eval_samples: int = Field(
        0, ge=0
    )  # samples per test prompt (pass@k, entropy, ...); 0: greedy only
    eval_teacher_kl: bool = False  # with eval_samples: also reverse/forward KL to the teacher
    save_every: int = Field(0, ge=0)  # 0: no intermediate checkpoints
    keep_last: int = Field(0, ge=0)  # complete checkpoints kept (older ones deleted); 0: all
    # false: a fresh run (refused in a used output_dir unless `overwrite`); true: resume from
    # the newest complete checkpoint (refused when there is none); auto: resume if one exists.
    resume: bool | Literal["auto"] = False
    resume_allow_changes: bool = False  # resume although hyper-parameters changed (listed)
    overwrite: bool = False  # a fresh run deletes an old run's metrics and checkpoints
    max_bad_steps: int = Field(5, ge=0)  # stop after this many non-finite steps in a row; 0: never
    max_staleness: int = Field(0, ge=0)  # rollouts sampled ahead of the update (0: synchronous)
    workers: Literal["ray", "local"] = "ray"  # local: every role in this process (tests, debugging)
    # A Ray cluster to join ("auto": the one `ray start` runs here; host:port; ray://...).
    # Unset: RAY_ADDRESS if set, else protege starts its own instance bound to 127.0.0.1.
    ray_address: str | None = None
    # Restarts of each rollout, teacher and reward actor after a crash, and retries of the
    # shard it was working on (with the current weights re-sent); learner ranks never restart.
    worker_restarts: int = Field(3, ge=0)
    placement_timeout_s: float = Field(300.0, gt=0)  # wait for a role's Ray resources, then stop


class LoggingConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with a key
    project: str = "protege"  # wandb project
    run_name: str | None = None  # wandb run name
    # a bar with step k/N, ETA and key metrics on stderr: auto draws it on a terminal only
    progress: bool | Literal["auto"] = "auto"


class Config(Section):
    student: StudentConfig = StudentConfig()
    # Teacher clients, scored in order; a single `teacher:` section is a one-item list.
    teachers: list[TeacherConfig] = Field(default_factory=lambda: [TeacherConfig()], min_length=1)
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    learner: LearnerConfig = LearnerConfig()
    algorithm: dict[str, Any] = {"name": "gkd"}  # name + hyper-parameters (listed below)
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    logging: LoggingConfig = LoggingConfig()
    output_dir: str = "runs/protege"  # metrics.jsonl, checkpoints/ and final/ go here
    fusion: FusionConfig = FusionConfig()  # several token-level teachers -> one target

    @model_validator(mode="before")
    @classmethod
    def _one_teacher_section(cls, tree: Any) -> Any:
        """`teacher: {...}` is shorthand for `teachers: [{...}]`."""
        if not isinstance(tree, dict) or "teacher" not in tree:
            return tree
        if "teachers" in tree:
            raise ValueError(
                "set either `teacher` (one teacher) or `teachers` (a list), not both; "
                "override list items as teachers.0.model=..."
            )
        tree = dict(tree)
        tree["teachers"] = [tree.pop("teacher")]
        return tree

    @field_validator("algorithm")
    @classmethod
    def _check_algorithm(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key, value in _floats(params):
            if not math.isfinite(value):
                raise AlgorithmConfigError(key, f"must be a finite number (got {value!r})")
        if not (info.context or {}).get(SKIP_ALGORITHM):
            from protege.algorithms import build_algorithm

            build_algorithm(params)  # raises AlgorithmConfigError naming the key
        return params

    @field_validator("teachers")
    @classmethod
    def _unique_teacher_names(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}; set teachers.N.name")
        return teachers

    @property
    def teacher(self) -> TeacherConfig:
        """The first teacher: the one token-level losses read (and the one decoding uses)."""
        return self.teachers[0]

    def build_algorithm(self) -> Algorithm:
        from protege.algorithms import build_algorithm

        return build_algorithm(self.algorithm)


def _floats(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float in a nested mapping/list."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = []
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, float):
            out.append((dotted, value))
        elif isinstance(value, (dict, list)):
            out.extend(_floats(value, f"{dotted}."))
    return out


def load_config(preset: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a preset (a path, or a name in configs/) plus `a.b=value` overrides."""
    return config_from_dict(read_tree(preset, overrides))


def read_tree(preset: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """The raw mapping of a preset (a path, or a name in configs/) with overrides applied."""
    tree = read_preset(preset) if preset else {}
    for override in overrides:
        key, value = parse_override(override)
        if key.startswith("teachers.") and "teachers" not in tree:
            # Indexing the list starts from the preset's one teacher (or the default one).
            tree["teachers"] = [tree.pop("teacher", {})]
        assign_dotted(tree, key, value)
    return tree


def validated(model: type[ModelT], tree: dict[str, Any], context: dict | None = None) -> ModelT:
    """`model` built from `tree`, or a ConfigError naming every bad key."""
    try:
        return model.model_validate(tree, context=context)
    except ValidationError as error:
        raise ConfigError(describe_error(error, model)) from None


def config_from_dict(tree: dict[str, Any], check_algorithm: bool = True) -> Config:
    """The validated Config; `check_algorithm=False` leaves the algorithm's own keys unchecked
    (`--help` lists them from the sources, without importing torch)."""
    try:
        check_size(tree)
    except ValueError as error:
        raise ConfigError(f"invalid config: {error}") from None
    try:
        tree = apply_task_defaults(tree)
    except OwnTaskError as error:
        raise ConfigError(f"invalid config:\n  {error}") from None
    algorithm = tree.get("algorithm")
    if isinstance(algorithm, dict) and "name" not in algorithm:
        default_name = Config.model_fields["algorithm"].default["name"]
        tree = {**tree, "algorithm": {"name": default_name, **algorithm}}
    return validated(Config, tree, None if check_algorithm else {SKIP_ALGORITHM: True})
