"""Typed blocks of a stage config: each key's type and default written once, checked once.

A recipe (stages/<stage>.py) reads its stage config (config.load_stage_config) and turns the blocks
it hands to the library into these dataclasses (`TrainSettings.of(sc["train"])`); the library reads
attributes, not `.get(key, default)`. `of` is idempotent (a settings object passes through), so a
library entry point that tests or benchmarks call with a plain dict (train.loop.run_training)
checks it the same way. An unknown key, a missing required key or a value of the wrong type is a
ConfigError naming the block, the key and the known keys.

The study config's schema (config.schema.yaml) says which keys a study may set; the defaults here
are what a stage does when the key is absent (config/README.md documents each). The content of the
stage-config files is unchanged by these types (config.stage_config writes the study's blocks as
they are), so run ids do not move.

Converted (each recipe / plug-in reads the attributes; tests/test_settings.py checks on every study
config stack that the values equal what the old `.get(key, default)` expressions gave, and that each
dataclass accepts every key the schema allows in its block):
  - study blocks: `train` (+ `lora`), the method blocks `method.hsw` / `method.thermostat` /
    `method.craft` (MethodSettings: checked at the train job's start, enabled or not), `icsm`,
    `craft` (the anchor cache's), `model.pretrain`; the model block's dtype default; ICSM's r;
  - whole stage configs: eval blocks, forgetting, probe, icsm, craft_anchors, cache, demos.
Not converted: the model block (backend / path / cache_dir / attn_implementation, read by
models/), and the artifacts the stages read back (probe.pt, anchors.pt, cache manifests: files,
not config).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from .errors import ConfigError

T = TypeVar("T")

# the model block's dtype when a stage config names none: config/config.yaml's (the real study's
# OpenVLA runs in bf16, as openvla trains and releases it); config/demo.yaml sets fp32 for the tiny VLA
DEFAULT_MODEL_DTYPE = "bf16"
# ICSM: SVD directions kept per representative layer (config/config.yaml icsm.r)
DEFAULT_ICSM_R = 128


def _check(value: Any, hint: Any, where: str) -> Any:
    """value converted to the annotation `hint` (int / float / bool / str / tuple / Optional / a
    settings dataclass), or a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r}: expected {hint}")
    if dataclasses.is_dataclass(hint):
        return hint.of(value, where) if hasattr(hint, "of") else value
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    return value


class Settings:
    """Mixin of the settings dataclasses: `of(block, where)` builds and checks one."""

    @classmethod
    def of(cls: type[T], block: Any, where: str | None = None) -> T:  # noqa: PYI019 (typing.Self: 3.11)
        if isinstance(block, cls):
            return block
        where = where or getattr(cls, "WHERE", cls.__name__)
        if not isinstance(block, dict):
            raise ConfigError(f"{where} must be a mapping, not {type(block).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(block) - set(fields))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}; known: {sorted(fields)} "
                "(a typo? a key of another block? config/README.md lists each)"
            )
        kw = {}
        for name, f in fields.items():
            if name in block:
                kw[name] = _check(block[name], hints[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{name} is required (config/README.md)")
        return cls(**kw)


@dataclass(frozen=True)
class LoraSettings(Settings):
    """train.lora: the LoRA adapter."""

    WHERE = "train.lora"
    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn", "mlp")
    layers: Any = "all"  # "all", or decoder-layer indices


@dataclass(frozen=True)
class TrainSettings(Settings):
    """train: the one training loop's settings (config/README.md, table `train`)."""

    WHERE = "train"
    max_steps: int
    batch_size: int
    lr: float
    lora: LoraSettings
    grad_accum: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float | None = None  # floor of the cosine / linear decay; None = 0 (train/schedule.py)
    init_adapter: str | None = None  # a PEFT LoRA adapter folder the run starts from (train/loop.py)
    init_step: int | None = None  # its step; None = its trainer_state.pt's global_step, else 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    image_aug: bool = False
    save_steps: int = 1000
    log_every: int = 10
    num_workers: int = 0
    loss_scaling: bool | None = None  # None: on for fp16
    loss_scale_init: float = 2.0**16
    nproc: int = 1
    use_wandb: bool = False
    wandb_project: str = "vlaforget"
    wandb_mode: str = "offline"
    eval_every: int = 0
    eval_episodes_per_task: int = 1
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    max_bad_steps: int = 5
    rollback_lr_factor: float = 0.5
    loss_check_min_steps: int = 20
    fused_optimizer: bool = False  # AdamW's fused kernel (train/speed.py)
    compile: Any = False  # torch.compile of each decoder layer: false, true (inductor) or a backend name
    lora_input_cast: bool = True  # peft's fp32 upcast of LoRA inputs (false skips it: train/speed.py)


@dataclass(frozen=True)
class HswSettings(Settings):
    """method.hsw: gradient surgery (train/plugins/hsw.py; config/README.md, table `method.hsw`)."""

    WHERE = "method.hsw"
    enabled: bool = False
    groups: str = "icsm"  # icsm | single | all_layers
    layers: Any = None  # None: every layer of the groups; or decoder-layer indices (negative: from the top)
    mode: str = "flow_down"  # flow_down (the user's: the surgered gradient reaches every layer below) | own_params
    beta: float = 1.0  # plastic gain (the Thermostat's starting point)
    gamma: float = 1.0  # fragile gain
    clamp: str = "per_tensor"  # per_tensor (the user's) | per_token | none
    eps: float = 1e-8  # the user's hsw_eps
    measure_effective: bool = True  # flow_down, logged steps: measure the gains reaching the layers below
    use_sensitivity_order: bool = True  # false: top-variance directions as fragile (ablation)


@dataclass(frozen=True)
class ThermostatSettings(Settings):
    """method.thermostat: closed-loop HSW gains (train/plugins/thermostat.py, methods/thermostat.py)."""

    WHERE = "method.thermostat"
    enabled: bool = False
    law: str = "user"  # user (eggplantsalt/icms thermostat.py) | calibrated (noise floor before step 1)
    estimator: str = "paired"  # full (C_T of the whole probe set, the user's) | paired (C_T of the same draw)
    metric: str = "raw"  # raw (the user's) | normalized | basis
    every: int = 50  # the user's update_interval: steps between control updates
    warmup_steps: int = 100  # law user: measure-only training steps (d every step, gains held)
    base_scale: float = 0.5  # law user: delta = max(0, d - base_scale * baseline)
    k_beta: float = 0.01  # law user: beta = beta_max / (1 + k_beta * delta)
    k_gamma: float = 0.01  # law user: gamma = gamma_max / (1 + k_gamma * delta)
    beta_min: float = 0.2
    beta_max: float = 1.0
    gamma_min: float = 0.1
    gamma_max: float = 1.0
    probe_batch: int = 4  # the user's probe_batch_size
    probe_chunk: int | None = None  # None (or 0): the training micro-batch (train.batch_size)
    warmup_measurements: int = 4  # law calibrated: draws before step 1 (student = teacher)
    threshold_sigmas: float = 2.0  # law calibrated
    gain: float = 1.0  # law calibrated
    smoothing: float = 0.5  # law calibrated


@dataclass(frozen=True)
class CraftSettings(Settings):
    """method.craft: retention loss, dual variable, conflict projection (train/plugins/craft.py)."""

    WHERE = "method.craft"
    enabled: bool = False
    epsilon: float = 0.05  # retention budget (OpenVLA CRaFT guide)
    lambda_init: float = 0.0
    lambda_lr: float = 1e-4  # the OpenVLA CRaFT guide's --craft.lambda_lr (docs/methods.md §5)
    dual: bool = True  # false: the fixed λ below
    fixed_lambda: float = 0.1
    projection: bool = True
    anchor: str | None = None  # the retention feature's pooling; None: the anchor cache's own
    anchor_batch_size: int | None = None  # None (or 0): train.batch_size
    fused_forward: bool = True


@dataclass(frozen=True)
class MethodSettings(Settings):
    """method: a method's plug-in blocks (config.method_config: every block present, off unless enabled)."""

    WHERE = "method"
    hsw: HswSettings = dataclasses.field(default_factory=HswSettings)
    thermostat: ThermostatSettings = dataclasses.field(default_factory=ThermostatSettings)
    craft: CraftSettings = dataclasses.field(default_factory=CraftSettings)


@dataclass(frozen=True)
class IcsmSettings(Settings):
    """icsm: the ICSM stage's block (stages/icsm.py, methods/icsm.py; config/README.md, table `icsm`)."""

    WHERE = "icsm"
    layers: Any = "auto"  # "auto" (the last four decoder layers in two groups) or decoder-layer indices
    groups: dict | None = None  # override: {A: {layers: [...], rep: ...}, B: {...}}
    r: int = DEFAULT_ICSM_R
    injection: str = "unit"  # unit: epsilon * u_k (the user's offline_icms.py) | std: alpha * std_k * u_k
    epsilon: float = 1e-3  # unit injection's size (the user's epsilon)
    alpha: float = 1.0  # std injection's size, in units of the pooled-state std along u_k
    sensitivity_dtype: str = "fp32"  # fp32: the icsm stage's teacher in float32 | model: model.dtype
    sensitivity_samples: int = 128
    direction_batch: int = 16
    fragile_dim: int | None = None  # None: max(1, r' // 2) most sensitive (the user's default)
    plastic_dim: int | None = None  # None: max(1, r' // 4) least sensitive (the user's default)


@dataclass(frozen=True)
class CraftAnchorSettings(Settings):
    """craft: the CRaFT anchor cache's block (stages/craft_anchors.py; config/README.md, table `craft`)."""

    WHERE = "craft"
    layer: int = -2  # hidden_states index of the anchors (config.stage_config writes the same default)
    pooling: str = "mean_image_tokens"
    n_anchors: int = 512
    batch_size: int = 8


@dataclass(frozen=True)
class IcsmStageSettings(Settings):
    """The icsm stage's config (config.stage_config(cfg, "icsm", probe set))."""

    WHERE = "icsm stage config"
    stage: str
    root: str
    allowed_root: str
    model: dict
    probe_dir: str
    out_dir: str
    icsm: IcsmSettings = dataclasses.field(default_factory=IcsmSettings)
    world: str | None = None
    code: str | None = None
    code_files: dict | None = None
    inputs: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class CraftAnchorsStageSettings(Settings):
    """The craft_anchors stage's config (config.stage_config(cfg, "craft_anchors", anchor set))."""

    WHERE = "craft_anchors stage config"
    stage: str
    root: str
    allowed_root: str
    model: dict
    dataset: dict
    out_dir: str
    craft: CraftAnchorSettings = dataclasses.field(default_factory=CraftAnchorSettings)
    shots: int | None = None  # a few-shot run's anchors: its few-shot subset
    shots_seed: int | None = None
    seed: int = 0
    world: str | None = None
    code: str | None = None
    code_files: dict | None = None
    inputs: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class ProbeStageSettings(Settings):
    """The probe stage's config (config.stage_config(cfg, "probe", key): the study's `probe` block
    flattened, its dataset block and the model block)."""

    WHERE = "probe stage config"
    stage: str
    root: str
    allowed_root: str
    model: dict
    dataset: dict
    n: int
    out_dir: str
    world: str | None = None
    code: str | None = None
    code_files: dict | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    split: str = "heldout"  # heldout | train | all
    trained_suites: tuple[str, ...] = ()
    batch_size: int = 8


@dataclass(frozen=True)
class CacheStageSettings(Settings):
    """The cache stage's config (config.stage_config(cfg, "cache", dataset): data's cache keys)."""

    WHERE = "cache stage config"
    stage: str
    root: str
    allowed_root: str
    dataset: str
    rlds_dir: str
    image_size: int
    out_dir: str
    world: str | None = None
    code: str | None = None
    code_files: dict | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    train_split: float = 0.95
    heldout: str = "per_task"  # per_task | tail
    image_key: str = "observation/image"
    state_key: str = "observation/state"
    transform: str | None = None  # None: data/transforms.py by the dataset's name


@dataclass(frozen=True)
class DemosStageSettings(Settings):
    """The demos stage's config (config.stage_config(cfg, "demos", dataset): data.metaworld's keys)."""

    WHERE = "demos stage config"
    stage: str
    root: str
    allowed_root: str
    dataset: str
    tasks: tuple[str, ...]
    camera: str
    render_size: int
    max_steps: int
    episodes_per_task: int
    seed: int
    out_dir: str
    world: str | None = None
    code: str | None = None
    code_files: dict | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    instructions: dict = dataclasses.field(default_factory=dict)
    workers: int = 1


# the tiny teacher's VQA samples (model.pretrain.vqa_train_samples / vqa_heldout_samples)
DEFAULT_VQA_TRAIN_SAMPLES = 6000
DEFAULT_VQA_HELDOUT_SAMPLES = 400


@dataclass(frozen=True)
class PretrainSettings(Settings):
    """model.pretrain: the tiny teacher's pretraining (stages/model.py, train/pretrain.py)."""

    WHERE = "model.pretrain"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    vqa_fraction: float = 0.3
    seed: int = 0
    threads: int = 1  # torch CPU threads of the model stage
    bin_sigma: float | None = 0.0  # soft labels over neighbouring action bins (None or 0: hard labels)
    image_aug: bool | None = None  # None: train.pretrain.pretrain's image_aug argument (true)
    vqa_train_samples: int = DEFAULT_VQA_TRAIN_SAMPLES
    vqa_heldout_samples: int = DEFAULT_VQA_HELDOUT_SAMPLES
    dataset: str | None = None  # config side only (config.tiny_pretrain_dataset); None: data.metaworld.upstream

    @classmethod
    def of_keys(cls, block: Any, where: str | None = None) -> PretrainSettings:
        """Only this block's keys of a larger mapping (bench/teacher_sweep.py's variants)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.of({k: v for k, v in dict(block).items() if k in names}, where)


def model_dtype(model_block: dict | None) -> str:
    """The model block's dtype, DEFAULT_MODEL_DTYPE when it names none."""
    return (model_block or {}).get("dtype") or DEFAULT_MODEL_DTYPE


@dataclass(frozen=True)
class ForgettingSettings(Settings):
    """The forgetting stage's config (config.stage_config(cfg, "forgetting", run); eval.forgetting
    of the study config)."""

    WHERE = "forgetting stage config"
    stage: str
    root: str
    allowed_root: str
    run_name: str
    model: dict
    probe_dir: str
    icsm_dir: str
    out_file: str
    world: str = "metaworld"
    code: str | None = None
    code_files: dict = dataclasses.field(default_factory=dict)  # per-file code hashes (freshness: not in the id)
    inputs: dict = dataclasses.field(default_factory=dict)
    adapter_dir: str | None = None  # None: the teacher itself
    vqa_jsonl: str | None = None  # a multiple-choice VQA JSONL (eval/vqa_mc.py); else vqa_datasets
    vqa_categories: tuple[str, ...] = ()  # keep only these categories of the JSONL (empty: all)
    vqa_n: int | None = None  # questions: None = all of the JSONL / DEFAULT_VQA_N from the caches
    vqa_image_size: int | None = 224
    vqa_datasets: tuple[Any, ...] = ()  # dataset blocks whose caches generate questions (metaworld)
    camera: str = "corner3"  # the camera of those cache-generated questions
    seed: int = 0
    drift_samples: int = 256  # probe samples for drift / CKA
    craft_layer: int = -2  # drift / CKA also at CRaFT's anchor layer (hidden_states index)
    batch_size: int = 16  # forward batch (--batch-size overrides)


@dataclass(frozen=True)
class EvalSettings(Settings):
    """An eval block (config.eval_block: the eval stage's `eval`, the train stage's `periodic_eval`):
    the study's `eval` keys, the suite's statistics, and the world's own keys."""

    WHERE = "eval block"
    suite: str
    episodes_per_task: int
    num_envs: int = 1
    videos_per_task: int = 0
    center_crop: bool = False
    pipeline_groups: int = 1
    image_size: int | None = None  # None: the backend's own
    unnorm_dataset: str | None = None
    stats_path: str | None = None
    # Meta-World (a block that names its tasks is a Meta-World block)
    tasks: tuple[str, ...] = ()
    camera: str | None = None
    render_size: int | None = None
    instructions: dict = dataclasses.field(default_factory=dict)
    seed: int = 500000  # first Meta-World episode seed (beyond every demo seed)
    max_steps: Any = None  # episode cap: Meta-World an int or {task: cap, default:}; LIBERO an override
    # LIBERO
    config_path: str | None = None
    resolution: int = 256
    wait_steps: int | None = None  # None: envs.libero.WAIT_STEPS
    n_tasks: int | None = None  # the suite's first N tasks (smoke tests)

    @property
    def world(self) -> str:
        """Meta-World blocks name their tasks, LIBERO blocks take the suite's."""
        return "metaworld" if self.tasks else "libero"


DEFAULT_MW_MAX_STEPS = 150  # Meta-World episode cap when eval.metaworld.max_steps is not set
