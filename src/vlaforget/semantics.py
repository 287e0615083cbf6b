"""Which keys of a stage config can change its result: the ids (io.config_id, stageconfig.run_id_of)
leave the others out, so changing them reruns and restarts nothing (docs/DEVELOPMENT.md, "What
reruns"). Base layer: imports nothing of vlaforget (io and freshness read it).
"""

from __future__ import annotations


def periodic_eval_matters(tcfg: dict) -> bool:
    """Periodic evaluation changes a run only by stopping it early (the loop isolates its RNG use)."""
    return bool(tcfg.get("eval_every")) and bool(tcfg.get("early_stopping_patience"))


# ----------------------------------------------------------------------------- what an id covers

# Stage-config keys (dotted) that cannot change a stage's result: they stay in the stage-config file
# for the job to read, but are left out of its config id and run id, so changing one reruns and
# restarts nothing. Why each cannot change a result (docs/DEVELOPMENT.md, "What reruns"):
# log_every: which steps are logged (the HSW statistics of a logged step do not touch its gradient);
# save_steps: where checkpoints fall (a resume is bit-exact from any of them); use_wandb/wandb_*:
# a copy of the logs; num_workers: who builds the batches (the same batches: train/batches.py);
# demos' workers: the first N successful seeds per task, whoever plays them.
# train.init_adapter: where the adapter a run starts from lies (its files' sha256 is in the id,
# `init_adapter_files`), so a moved adapter reruns nothing.
# model.cache_dir (every stage with a model block): where the HF hub cache lies, as the data root is
# factored out of every id; what is read from it is named by model.path.
NON_SEMANTIC: dict[str, tuple[str, ...]] = {
    "train": (
        "train.log_every",
        "train.save_steps",
        "train.use_wandb",
        "train.wandb_project",
        "train.wandb_mode",
        "train.num_workers",
        "train.init_adapter",
    ),
    "demos": ("workers",),
}
NON_SEMANTIC_ALL = ("model.cache_dir",)
# Periodic evaluation without early stopping only logs (the loop runs it with its RNG isolated), so
# its cadence and protocol are then non-semantic too.
PERIODIC_EVAL_KEYS = (
    "train.eval_every",
    "train.eval_episodes_per_task",
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
    "periodic_eval",
)


def non_semantic_keys(sc: dict) -> tuple[str, ...]:
    """The dotted keys of stage config sc that its ids leave out (NON_SEMANTIC + the conditional ones)."""
    keys = NON_SEMANTIC.get(sc.get("stage"), ()) + NON_SEMANTIC_ALL
    if sc.get("stage") == "train" and not periodic_eval_matters(sc.get("train") or {}):
        keys = keys + PERIODIC_EVAL_KEYS
    return keys


def _drop(d: dict, dotted: str) -> dict:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return d
    out = dict(d)
    if not rest:
        del out[head]
    elif isinstance(out[head], dict):
        out[head] = _drop(out[head], rest)
    return out


def semantic_view(sc: dict) -> dict:
    """sc without the keys that cannot change its result (what io.config_id hashes); `code_files`
    is the detail of `code`."""
    for k in non_semantic_keys(sc) + ("code_files",):
        sc = _drop(sc, k)
    return sc
