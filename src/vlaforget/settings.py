"""Typed blocks of a stage config: each key's type and default written once, checked once.

A recipe (stages/<stage>.py) reads its stage config (stagefile.load_stage_config) and turns the blocks
it hands to the library into these dataclasses (`TrainSettings.of(sc["train"])`); the library reads
attributes, not `.get(key, default)`. `of` is idempotent (a settings object passes through), so a
library entry point that tests or benchmarks call with a plain dict (train.loop.run_training)
checks it the same way. An unknown key, a missing required key or a value of the wrong type is a
ConfigError naming the block, the key and the known keys.

One source per key (issue 30.2): each field of the study config's typed blocks (STUDY_BLOCKS: model,
model.pretrain, icsm, craft, train, train.lora, method.hsw / thermostat / craft) is declared once here
with `key(doc, default)`: its type (the annotation), its default (none: required) and a one-line doc.
tests/test_config_keys.py checks the rest against it: config.schema.yaml has every key of the same
type (the schema keeps the ranges and word lists), config/config.yaml sets each key to its default or
lists it as a study override with its reason, and config/README.md's key tables are the ones
`vlaforget config-doc` generates. Code that needs a default reads it here (`TrainSettings.precision`,
`TrainSettings.default("precision")`), never copies the literal. The doc is field metadata: the
stage-config files are the study's blocks as they are (stageconfig.stage_config), so run ids do not move.

Converted (each recipe / plug-in reads the attributes; tests/test_settings.py checks on every study
config stack that the values equal what the old `.get(key, default)` expressions gave):
  - study blocks: `train` (+ `lora`), the method blocks `method.hsw` / `method.thermostat` /
    `method.craft` (MethodSettings: checked at the train job's start, enabled or not), `icsm`,
    `craft` (the anchor cache's), `model` (ModelSettings: checked when the study config is loaded;
    its dtype default) and `model.pretrain`;
  - whole stage configs: eval blocks, forgetting, probe, icsm, craft_anchors, cache, demos.
Not converted: the stage config's model block as models/ reads it (the study block plus the
derived path / cache_dir / unnorm_key), and the artifacts the stages read back (probe.pt,
anchors.pt, cache manifests: files, not config).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from .errors import ConfigError

T = TypeVar("T")


def key(doc: str, default: Any = dataclasses.MISSING) -> Any:
    """A config key of a typed block: its default (none: required) and its one-line doc, the one
    source config/config.yaml, config.schema.yaml and config/README.md are tested against
    (tests/test_config_keys.py). The doc is field metadata: it is in no stage config and no run id."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def _check(value: Any, hint: Any, where: str) -> Any:
    """value converted to the annotation `hint` (int / float / bool / str / tuple / Optional / a
    settings dataclass), or a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own error (it names the nested key)
            return _check(value, real[0], where)
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

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of key `name` (a KeyError for a required key): read it here, never copy it."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise KeyError(f"{getattr(cls, 'WHERE', cls.__name__)}.{name} is required: it has no default")


@dataclass(frozen=True)
class LoraSettings(Settings):
    """train.lora: the LoRA adapter."""

    WHERE = "train.lora"
    r: int = key("LoRA rank (openvla's LIBERO recipe: 32)")
    alpha: float = key("LoRA alpha (scale alpha / r)", 16.0)
    dropout: float = key("LoRA dropout", 0.0)
    targets: tuple[str, ...] = key(
        "adapted modules: any of attn mlp vision projector lm_head patch_embed "
        "(openvla's all-linear = all six; the study keeps the first four)",
        ("attn", "mlp", "vision", "projector"),
    )
    layers: Any = key("all, or [first, last] decoder-layer range (inclusive)", "all")


@dataclass(frozen=True)
class TrainSettings(Settings):
    """train: the one training loop's settings (config/README.md, table `train`)."""

    WHERE = "train"
    max_steps: int = key("optimizer steps of a run")
    batch_size: int = key("samples per GPU per micro-step")
    lr: float = key("AdamW learning rate (openvla finetune.py: 5e-4)")
    lora: LoraSettings = key("the LoRA adapter (train.lora)")
    grad_accum: int = key("micro-steps per optimizer step", 1)
    lr_schedule: str = key("constant | cosine | linear (train/schedule.py)", "constant")
    warmup_steps: int = key("linear warm-up steps of the schedule", 0)
    min_lr: float | None = key(
        "floor of the cosine / linear decay; null = 0 (the user's min_learning_rate)", None
    )
    init_adapter: str | None = key(
        "a PEFT LoRA adapter folder the run starts from; null = a fresh LoRA", None
    )
    init_step: int | None = key(
        "init_adapter's step; null = its trainer_state.pt's global_step, else 0", None
    )
    weight_decay: float = key("AdamW weight decay", 0.0)
    max_grad_norm: float | None = key("gradient-norm clip; null = no clipping (openvla's)", None)
    precision: str = key("bf16 | fp16 (loss scaling) | fp32 autocast (openvla finetune.py: bf16)", "bf16")
    gradient_checkpointing: bool = key("recompute activations in the backward pass", False)
    image_aug: bool = key(
        "openvla's image augmentation: crop 0.9, brightness, contrast, saturation, hue", True
    )
    save_steps: int = key("checkpoint interval in steps (not in any id)", 2500)
    log_every: int = key("log interval in steps (not in any id)", 10)
    num_workers: int = key("DataLoader worker processes; 0 = in the training process", 2)
    loss_scaling: bool | None = key("fp16 loss scaling (torch.amp.GradScaler); null = on for fp16 only", None)
    loss_scale_init: float = key("initial fp16 loss scale, halved on each overflow step", 2.0**16)
    nproc: int = key("processes (GPUs) per run: > 1 runs torchrun --standalone", 1)
    use_wandb: bool = key("W&B logging (not in any id)", False)
    wandb_project: str = key("W&B project", "vlaforget")
    wandb_mode: str = key("offline | online | disabled", "offline")
    eval_every: int = key("periodic closed-loop eval interval in steps; 0 = off", 0)
    eval_episodes_per_task: int = key("episodes per task of a periodic eval", 1)
    early_stopping_patience: int = key("stop after this many periodic evals without improvement; 0 = off", 0)
    early_stopping_min_delta: float = key(
        "success-rate gain (a fraction) that counts as an improvement", 0.01
    )
    max_bad_steps: int = key("consecutive non-finite steps before one rollback to the last checkpoint", 5)
    rollback_lr_factor: float = key("learning-rate factor applied on that rollback", 0.5)
    loss_check_min_steps: int = key("runs of at least this many steps must end with a lower loss", 20)
    fused_optimizer: bool = key("AdamW's fused kernel (train/speed.py)", False)
    compile: Any = key("torch.compile of each decoder layer: false, true (inductor) or a backend name", False)
    lora_input_cast: bool = key("peft's fp32 upcast of LoRA inputs (false skips it: train/speed.py)", True)


class PluginSettings(Settings):
    """Mixin of a method plug-in's block (a field of MethodSettings): besides its keys, what generic code
    needs to know about the method, declared here so that adding a method touches no generic code.

    READS: the teacher artifacts its plug-in reads ('icsm', 'probe', 'craft': the stage jobs a run
    enabling it depends on, study.method_needs). COST: its steps' cost class in the plan's measured
    step-time factors (plan.MEASURED["train"]["method_factor"]; 'baseline' = LoRA's own cost)."""

    READS: tuple[str, ...] = ()
    COST = "baseline"


@dataclass(frozen=True)
class HswSettings(PluginSettings):
    """method.hsw: gradient surgery (train/plugins/hsw.py; config/README.md, table `method.hsw`)."""

    WHERE = "method.hsw"
    READS = ("icsm", "probe")  # the ICSM bases; the probe, checked not to be in the run's training data
    COST = "method"
    enabled: bool = key("gradient surgery on the ICSM layers", False)
    groups: str = key("icsm (ICSM's A/B groups) | single | all_layers", "icsm")
    layers: Any = key(
        "null: every layer of the groups; or decoder-layer indices (negative: from the top)", None
    )
    mode: str = key(
        "flow_down (the user's: the surgered gradient reaches every layer below) | own_params", "flow_down"
    )
    beta: float = key("plastic gain (the Thermostat's starting point)", 1.0)
    gamma: float = key("fragile gain (the Thermostat's starting point)", 1.0)
    clamp: str = key("per_tensor (the user's) | per_token | none", "per_tensor")
    eps: float = key("numerical eps of the clamp (the user's hsw_eps)", 1e-8)
    measure_effective: bool = key(
        "flow_down, logged steps: measure the gains reaching the layers below", True
    )
    use_sensitivity_order: bool = key("false: top-variance directions as fragile (ablation)", True)


@dataclass(frozen=True)
class ThermostatSettings(PluginSettings):
    """method.thermostat: closed-loop HSW gains (train/plugins/thermostat.py, methods/thermostat.py)."""

    WHERE = "method.thermostat"
    READS = ("icsm", "probe")  # the teacher's C_T per ICSM layer; the probe draws it measures drift on
    COST = "method"
    enabled: bool = key("closed-loop HSW gains from the probe drift", False)
    law: str = key("user (eggplantsalt/icms thermostat.py) | calibrated (noise floor before step 1)", "user")
    estimator: str = key(
        "paired (C_T of the same probe draw) | full (C_T of the whole probe set, the user's)", "paired"
    )
    metric: str = key("raw (the user's ||C_S - C_T||_F) | normalized | basis", "raw")
    every: int = key("the user's update_interval: steps between control updates", 50)
    warmup_steps: int = key("law user: measure-only training steps (d every step, gains held)", 100)
    base_scale: float = key("law user: delta = max(0, d - base_scale * baseline)", 0.5)
    k_beta: float = key("law user: beta = beta_max / (1 + k_beta * delta)", 0.01)
    k_gamma: float = key("law user: gamma = gamma_max / (1 + k_gamma * delta)", 0.01)
    beta_min: float = key("lower clamp of beta (> 0: beta never reaches 0)", 0.2)
    beta_max: float = key("upper clamp of beta", 1.0)
    gamma_min: float = key("lower clamp of gamma (the user's min_gamma)", 0.1)
    gamma_max: float = key("upper clamp of gamma", 1.0)
    probe_batch: int = key("probe samples per measurement (the user's probe_batch_size)", 4)
    probe_chunk: int | None = key(
        "probe forward in chunks of this many; null (or 0) = train.batch_size", None
    )
    warmup_measurements: int = key("law calibrated: draws before step 1 (student = teacher)", 4)
    threshold_sigmas: float = key("law calibrated: protection from floor + k * sigma", 2.0)
    gain: float = key("law calibrated: gain of the excess law", 1.0)
    smoothing: float = key("law calibrated: EMA of the gains", 0.5)


@dataclass(frozen=True)
class CraftSettings(PluginSettings):
    """method.craft: retention loss, dual variable, conflict projection (train/plugins/craft.py)."""

    WHERE = "method.craft"
    READS = ("craft",)  # the anchor cache (stage craft_anchors)
    COST = "craft"
    enabled: bool = key("CRaFT retention loss", False)
    epsilon: float = key("retention budget (OpenVLA CRaFT guide)", 0.05)
    lambda_init: float = key("initial dual variable", 0.0)
    lambda_lr: float = key("dual ascent step (the OpenVLA CRaFT guide's --craft.lambda_lr)", 1e-4)
    dual: bool = key("false: the fixed lambda below", True)
    fixed_lambda: float = key("lambda when dual is false", 0.1)
    projection: bool = key("project the action gradient when it conflicts with the retention gradient", True)
    anchor: str | None = key("the retention feature's pooling; null: the anchor cache's own", None)
    anchor_batch_size: int | None = key("anchors per retention step; null (or 0): train.batch_size", None)
    fused_forward: bool = key("one forward + backward of task and anchor rows (false: a separate pass)", True)


@dataclass(frozen=True)
class MethodSettings(Settings):
    """method: a method's plug-in blocks (study.method_config: every block present, off unless enabled)."""

    WHERE = "method"
    hsw: HswSettings = dataclasses.field(default_factory=HswSettings)
    thermostat: ThermostatSettings = dataclasses.field(default_factory=ThermostatSettings)
    craft: CraftSettings = dataclasses.field(default_factory=CraftSettings)


def method_blocks() -> dict[str, type[PluginSettings]]:
    """{block name: its settings class} of every method plug-in, in MethodSettings' order: the one
    list of methods generic code reads (study.method_config / method_needs, plan.method_class)."""
    return {f.name: f.default_factory for f in dataclasses.fields(MethodSettings)}  # type: ignore[misc]


@dataclass(frozen=True)
class IcsmSettings(Settings):
    """icsm: the ICSM stage's block (stages/icsm.py, methods/icsm.py; config/README.md, table `icsm`)."""

    WHERE = "icsm"
    layers: Any = key("auto (the last four decoder layers in two groups) or decoder-layer indices", "auto")
    groups: dict | None = key("override: {A: {layers: [...], rep: ...}, B: {...}}", None)
    r: int = key("SVD directions kept per representative layer", 128)
    injection: str = key(
        "unit: epsilon * u_k (the user's offline_icms.py) | std: alpha * std_k * u_k", "unit"
    )
    epsilon: float = key("unit injection's size (the user's epsilon)", 1e-3)
    alpha: float = key("std injection's size, in units of the pooled-state std along u_k", 1.0)
    sensitivity_dtype: str = key("fp32 | fp64 | model (model.dtype): the icsm stage's teacher", "fp32")
    sensitivity_samples: int = key("probe samples used to measure KL per direction", 128)
    direction_batch: int = key("directions evaluated per forward pass", 16)
    fragile_dim: int | None = key(
        "fragile directions; null = max(1, r' // 2) most sensitive (the user's)", None
    )
    plastic_dim: int | None = key(
        "plastic directions; null = max(1, r' // 4) least sensitive (the user's)", None
    )


@dataclass(frozen=True)
class CraftAnchorSettings(Settings):
    """craft: the CRaFT anchor cache's block (stages/craft_anchors.py; config/README.md, table `craft`)."""

    WHERE = "craft"
    layer: int = key("hidden_states index of the anchors (-2 = second to last)", -2)
    pooling: str = key("mean_image_tokens | mean_instruction_tokens | mean_all", "mean_image_tokens")
    n_anchors: int = key("anchor samples cached", 512)
    batch_size: int = key("batch for computing them", 8)


@dataclass(frozen=True)
class IcsmStageSettings(Settings):
    """The icsm stage's config (stageconfig.stage_config(cfg, "icsm", probe set))."""

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
    """The craft_anchors stage's config (stageconfig.stage_config(cfg, "craft_anchors", anchor set))."""

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
    """The probe stage's config (stageconfig.stage_config(cfg, "probe", key): the study's `probe` block
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
    """The cache stage's config (stageconfig.stage_config(cfg, "cache", dataset): data's cache keys)."""

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
    """The demos stage's config (stageconfig.stage_config(cfg, "demos", dataset): data.metaworld's keys)."""

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


@dataclass(frozen=True)
class PretrainSettings(Settings):
    """model.pretrain: the tiny teacher's pretraining (stages/model.py, train/pretrain.py)."""

    WHERE = "model.pretrain"
    steps: int = key("pretraining steps", 1000)
    batch_size: int = key("pretraining batch", 32)
    lr: float = key("pretraining learning rate", 1e-3)
    weight_decay: float = key("AdamW weight decay", 0.01)
    vqa_fraction: float = key("share of visual-question samples in a batch", 0.3)
    seed: int = key("pretraining seed", 0)
    threads: int = key("torch CPU threads of the model stage (the model rule's threads)", 1)
    bin_sigma: float | None = key(
        "Gaussian soft labels over neighbouring action bins; null or 0 = one-hot CE", 0.0
    )
    image_aug: bool | None = key("openvla's crop + colour jitter; null = on", None)
    vqa_train_samples: int = key("visual questions drawn for training (Meta-World only)", 6000)
    vqa_heldout_samples: int = key("visual questions drawn for held-out accuracy (Meta-World only)", 400)
    dataset: str | None = key("the pretraining dataset; null = data.metaworld.upstream", None)
    vqa_datasets: tuple[str, ...] = key(
        "more datasets whose train-split frames give visual questions, vqa_train_samples each (e.g. "
        "the downstream suite: the scenes fine-tuning rewrites; Meta-World only)",
        (),
    )

    @classmethod
    def of_keys(cls, block: Any, where: str | None = None) -> PretrainSettings:
        """Only this block's keys of a larger mapping (bench/teacher_sweep.py's variants)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.of({k: v for k, v in dict(block).items() if k in names}, where)


# the tiny teacher's VQA samples (model.pretrain.vqa_train_samples / vqa_heldout_samples)
DEFAULT_VQA_TRAIN_SAMPLES = PretrainSettings.vqa_train_samples
DEFAULT_VQA_HELDOUT_SAMPLES = PretrainSettings.vqa_heldout_samples


@dataclass(frozen=True)
class ModelSettings(Settings):
    """model: the base model (config.py derives each stage config's model block; models/ loads it)."""

    WHERE = "model"
    backend: str = key("openvla | tiny")
    base: str = key("short name of the base model, used in paths and run ids")
    path: str | None = key(
        "HF hub id or local dir (must load offline); null for tiny (built at {root}/models)", None
    )
    cache_dir: str | None = key(
        "HF hub cache a hub-id path is read from, in place; null = {root}/hf_cache", None
    )
    # bf16: the real study's OpenVLA runs in bf16, as openvla trains and releases it; config/demo.yaml
    # sets fp32 for the tiny VLA
    dtype: str = key("bf16 | fp16 | fp32 weights (V100: fp16)", "bf16")
    attn_implementation: str | None = key("e.g. flash_attention_2; null = the library default", None)
    tiny: dict | None = key("tiny backend only: its sizes (models/tiny)", None)
    pretrain: PretrainSettings | None = key("tiny backend only: the teacher's pretraining", None)


# the model block's dtype when a stage config names none
DEFAULT_MODEL_DTYPE = ModelSettings.dtype
# ICSM: SVD directions kept per representative layer
DEFAULT_ICSM_R = IcsmSettings.r


def model_dtype(model_block: dict | None) -> str:
    """The model block's dtype, DEFAULT_MODEL_DTYPE when it names none."""
    return (model_block or {}).get("dtype") or DEFAULT_MODEL_DTYPE


@dataclass(frozen=True)
class ForgettingSettings(Settings):
    """The forgetting stage's config (stageconfig.stage_config(cfg, "forgetting", run); eval.forgetting
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
    code_files: dict = dataclasses.field(
        default_factory=dict
    )  # per-file code hashes (freshness: not in the id)
    inputs: dict = dataclasses.field(default_factory=dict)
    adapter_dir: str | None = None  # None: the teacher itself
    vqa_jsonl: str | None = None  # a multiple-choice VQA JSONL (eval/vqa_mc.py); else vqa_datasets
    vqa_categories: tuple[str, ...] = ()  # keep only these categories of the JSONL (empty: all)
    vqa_n: int | None = None  # questions: None = all of the JSONL / DEFAULT_VQA_N from the caches
    vqa_image_size: int | None = 224
    vqa_datasets: tuple[Any, ...] = ()  # dataset blocks whose caches generate questions (metaworld)
    # eval.forgetting.downstream_vqa_suites: dataset blocks whose held-out frames give a second question
    # set, scored apart (vqa_mc_downstream) so the upstream-scene VQA numbers stay comparable
    vqa_downstream_datasets: tuple[Any, ...] = ()
    camera: str = "corner3"  # the camera of those cache-generated questions
    seed: int = 0
    drift_samples: int = 256  # probe samples for drift / CKA
    craft_layer: int = -2  # drift / CKA also at CRaFT's anchor layer (hidden_states index)
    batch_size: int = 16  # forward batch (--batch-size overrides)


@dataclass(frozen=True)
class EvalSettings(Settings):
    """An eval block (stageconfig.eval_block: the eval stage's `eval`, the train stage's `periodic_eval`):
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
    first_init_state: int = 0  # LIBERO: init states first_init_state ... + episodes_per_task - 1
    # eval.initial_states per_seed: the training seed whose block of initial states this is (its runs
    # and the teacher's `teacher__s{seed}` evals share it); None: the one shared block
    state_block: int | None = None

    @property
    def world(self) -> str:
        """Meta-World blocks name their tasks, LIBERO blocks take the suite's."""
        return "metaworld" if self.tasks else "libero"


DEFAULT_MW_MAX_STEPS = 150  # Meta-World episode cap when eval.metaworld.max_steps is not set

# eval.initial_states: which initial states a run is evaluated on (study.state_start).
#   shared: every run of every seed (and the teacher) on the same ones: Meta-World episode seeds
#     eval.metaworld.seed + i, LIBERO init states 0 … episodes_per_task-1;
#   per_seed: the runs of training seed s (and the teacher's evals `teacher__s{s}`) on a block of their
#     own, disjoint from every other seed's: Meta-World seeds eval.metaworld.seed + s*episodes_per_task + i,
#     LIBERO init states k*episodes_per_task + i (k: s's index in study.initial_state_seeds).
INITIAL_STATES = ("shared", "per_seed")
DEFAULT_INITIAL_STATES = "shared"


# The study config's typed blocks: where each lives in the study config -> its settings class. Each
# field's type, default and doc (`key`) are the one source of that key: tests/test_config_keys.py
# checks config.schema.yaml (every key there, of the same type), config/config.yaml (the same value,
# or a listed study override) and config/README.md (documented) against them, and
# `vlaforget config-doc` prints the table.
STUDY_BLOCKS: dict[str, type] = {
    "model": ModelSettings,
    "model.pretrain": PretrainSettings,
    "icsm": IcsmSettings,
    "craft": CraftAnchorSettings,
    "train": TrainSettings,
    "train.lora": LoraSettings,
    "methods.*.hsw": HswSettings,
    "methods.*.thermostat": ThermostatSettings,
    "methods.*.craft": CraftSettings,
}


def type_name(hint: Any) -> str:
    """A field's annotation as a config/README.md reader reads it (int, number, bool, str, list, ...)."""
    origin = typing.get_origin(hint)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " | ".join(type_name(a) for a in args) + (
            " | null" if len(args) < len(typing.get_args(hint)) else ""
        )
    if origin is tuple:
        return "list"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return {int: "int", float: "number", bool: "bool", str: "str", dict: "mapping", Any: "any"}.get(
        hint, str(hint)
    )


def key_rows(cls: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of each field of a settings class; default "required" when it has none."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        try:
            d = cls.default(f.name)
            d = (
                "null"
                if d is None
                else (
                    "mapping"
                    if dataclasses.is_dataclass(d)
                    else str(list(d))
                    if isinstance(d, tuple)
                    else str(d).lower()
                    if isinstance(d, bool)
                    else str(d)
                )
            )
        except KeyError:
            d = "required"
        rows.append((f.name, type_name(hints[f.name]), d, f.metadata.get("doc", "")))
    return rows


def config_doc() -> str:
    """Markdown: one table of (key, type, default, doc) per typed block of the study config."""
    out = []
    for where, cls in STUDY_BLOCKS.items():
        out += [f"### `{where}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [
            "| " + " | ".join(c.replace("|", "\\|") for c in (f"`{k}`", t, f"`{d}`", doc)) + " |"
            for k, t, d, doc in key_rows(cls)
        ]
        out.append("")
    return "\n".join(out)


README_BEGIN = "<!-- vlaforget config-doc: begin (generated from src/vlaforget/settings.py; do not edit) -->"
README_END = "<!-- vlaforget config-doc: end -->"


def readme_with_doc(text: str) -> str:
    """config/README.md's text with its generated section (between README_BEGIN and README_END)
    replaced by config_doc()."""
    if README_BEGIN not in text or README_END not in text:
        raise ConfigError(
            f"config/README.md has no generated section: add the lines {README_BEGIN!r} and {README_END!r}"
        )
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    return f"{head}{README_BEGIN}\n{config_doc()}{README_END}{tail}"


def add_args(p: Any) -> None:
    """`vlaforget config-doc`: the typed keys' table (key, type, default, meaning)."""
    p.add_argument(
        "--write",
        metavar="README",
        default=None,
        help="rewrite the generated section of this file (config/README.md) instead of printing",
    )


def main(args: Any) -> int:
    if args.write is None:
        print(config_doc())
        return 0
    from pathlib import Path

    path = Path(args.write)
    path.write_text(readme_with_doc(path.read_text()))
    print(f"wrote the generated key tables into {path}")
    return 0
