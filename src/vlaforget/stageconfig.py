"""Stage configs: the exact subset of the study config (plus derived paths) that shapes one stage
job's output, assembled from the study config (`stage_config(cfg, stage, key)`).

Its id (io.config_id) names where the job's outputs live (`job_dir/{id}/`) and where the workflow
writes it (`{root}/configs/{stage}/{key}/{id}.yaml`, stagefile.stage_config_text); the stage command
reads only that file (stagefile.load_stage_config). So a config change gives exactly the stages whose
stage config changed new outputs beside the old ones, and every stage is runnable by hand with the
same file (`vlaforget <stage> --config FILE`). The jobs each job reads come from the study's job graph
(study.upstream); a stage's code hash from codedeps.stage_code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import codedeps
from .errors import ConfigError
from .freshness import COMPLETION, completion_file
from .io import OUT_TAG, adapter_hashes, config_id, stable_hash
from .paths import Layout, resolve_allowed_root, resolve_root
from .semantics import _drop
from .settings import (
    DEFAULT_MODEL_DTYPE,
    CacheStageSettings,
    CraftAnchorSettings,
    CraftAnchorsStageSettings,
    DemosStageSettings,
    EvalSettings,
    ForgettingSettings,
    ProbeStageSettings,
    TrainSettings,
)
from .study import (
    anchor_set,
    chain_previous,
    dataset_tasks,
    is_teacher,
    method_config,
    method_needs,
    parse_anchor_set,
    parse_run_name,
    parse_shots,
    per_seed_states,
    probe_set_name,
    run_seed,
    stage_jobs,
    state_start,
    suites_all,
    tiny_corpus_datasets,
    tiny_pretrain_dataset,
    trained_suites,
    upstream,
)

# ----------------------------------------------------------------------------- where things lie


def layout(cfg: dict) -> Layout:
    return Layout(resolve_root(cfg))


def rlds_root(cfg: dict) -> Path:
    """Folder holding {dataset}/ TFDS builder dirs (world libero; Meta-World: rlds_dir)."""
    if cfg["data"].get("fixture"):  # generated here, in a folder named by what it was made from
        return layout(cfg).root / "datasets" / "rlds" / "fixture" / stable_hash(fixture_params(cfg))
    return Path(cfg["data"]["rlds_dir"])


def rlds_dir(cfg: dict, dataset: str) -> str:
    """One dataset's RLDS: the demos job's output (Meta-World), else {rlds_root}/{dataset}."""
    if cfg["world"] == "metaworld":
        return job_output(cfg, "demos", dataset)
    return str(rlds_root(cfg) / dataset)


def fixture_params(cfg: dict) -> dict:
    """What the LIBERO-format fixture (data.fixture, the rehearsal) is made from: its folder's name."""
    fx = {
        "tasks": 2,
        "episodes": 3,
        "steps": 24,
        "seed": 0,
        "shards": 1,
        "source": "synthetic",
        **(cfg["data"].get("fixture") or {}),
    }
    out = suites_all(cfg)
    if cfg["model"]["backend"] == "tiny":
        out += [d for d in tiny_corpus_datasets(cfg) if d not in out]
    return {**fx, "suites": out}


def libero_vqa_params(cfg: dict) -> dict | None:
    """What the LIBERO question set (eval.forgetting.libero_vqa) is made from (None: not made here)."""
    f = cfg["eval"].get("forgetting") or {}
    v = f.get("libero_vqa")
    if not v or f.get("vqa_jsonl"):
        return None
    return {
        "suites": list(
            v.get("suites") or ["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]
        ),
        "n": int(v.get("n", 600)),
        "seed": int(v.get("seed", cfg["seed"])),
        "states_per_task": int(v.get("states_per_task", 2)),
        "tasks_per_suite": int(v["tasks_per_suite"]) if v.get("tasks_per_suite") else None,
        "config_path": (cfg["eval"].get("libero") or {}).get("config_path"),
    }


def libero_vqa_dir(cfg: dict) -> Path:
    """The question set's folder: {root}/vqa/libero/{hash of what it is made from}."""
    return layout(cfg).libero_vqa() / stable_hash(libero_vqa_params(cfg) or {})


def model_path(cfg: dict, own: bool = False) -> str:
    """Where the base model is loaded from: built here (tiny: the model job's output folder) or
    path/hub id (openvla). `own`: for the model job itself (its output path is filled in later)."""
    m = cfg["model"]
    if m["backend"] == "tiny" and not m.get("path"):
        return OUT_TAG if own else job_output(cfg, "model", m["base"])
    return str(m["path"])


def model_cache_dir(cfg: dict) -> Path:
    """The HF hub cache a hub-id model.path is resolved in, in place: model.cache_dir (e.g. the
    user's existing /opt/data/private/openvla_icms/hf_cache), else {root}/hf_cache."""
    return Path(cfg["model"].get("cache_dir") or layout(cfg).hf_cache)


# ----------------------------------------------------------------------------- ids


def max_steps_in_run_id(tcfg: dict) -> bool:
    """Whether the step target shapes the steps before it: a decaying LR schedule (cosine, linear)
    is planned over max_steps. With a constant one (after any warmup) a run trained to N is the
    first N steps of a run to M > N, so max_steps stays out of the run id and raising it continues
    the run from its checkpoint at N (train/loop.py)."""
    return tcfg.get("lr_schedule", TrainSettings.lr_schedule) != "constant"


def run_id_of(sc: dict, key: str) -> str:
    """A train job's run id: names the run and its checkpoints. Its config id without the data
    root (io.config_id), without the non-semantic keys and, where it cannot shape the steps before
    it, without max_steps."""
    body = sc if max_steps_in_run_id(sc["train"]) else {**sc, "train": _drop(sc["train"], "max_steps")}
    return f"{key}-{config_id(body)[:8]}"


def stage_config_id(cfg: dict, stage: str, key: str) -> str:
    """The config id of one stage job (the last part of its output path)."""
    return config_id(_stage_config_cached(cfg, stage, key))


# ----------------------------------------------------------------------------- blocks


def _base(cfg: dict, stage: str) -> dict:
    code, files = (
        codedeps.stage_code(stage, ()) if stage != "train" else (None, None)
    )  # train: per run (plug-ins)
    return {
        "stage": stage,
        "root": str(resolve_root(cfg)),
        "allowed_root": str(resolve_allowed_root(cfg)),
        "world": cfg["world"],
        "code": code,
        "code_files": dict(files) if files is not None else None,
    }


def _model_block(cfg: dict, own: bool = False) -> dict:
    """The teacher model block; `own`: the model stage's own (its built model is its output)."""
    m = cfg["model"]
    return {
        "backend": m["backend"],
        "base": m["base"],
        "path": model_path(cfg, own=own),
        "dtype": m.get("dtype") or DEFAULT_MODEL_DTYPE,
        "attn_implementation": m.get("attn_implementation"),
        "cache_dir": str(model_cache_dir(cfg)),
    }


def init_adapter_files(path: str | Path) -> dict[str, str]:
    """{file: sha256} of the adapter folder train.init_adapter names (in the run id), or a
    ConfigError naming the key and the fix."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise ConfigError(
            f"train.init_adapter = {p}: no PEFT adapter there (adapter_config.json missing); "
            "point it at the folder holding adapter_config.json and adapter_model.safetensors "
            "(the user's resume_adapter_dir), or set it to null"
        )
    files = adapter_hashes(p)
    if not any(f.startswith("adapter_model.") for f in files):
        raise ConfigError(
            f"train.init_adapter = {p} holds adapter_config.json but no adapter_model.safetensors "
            "/ .bin: copy the whole adapter folder"
        )
    return files


def _dataset_block(cfg: dict, dataset: str) -> dict:
    return {
        "name": dataset,
        "cache_dir": job_output(cfg, "cache", dataset),
        "tasks": dataset_tasks(cfg, dataset),
    }


def eval_block(cfg: dict, suite: str, seed: int | None = None) -> dict:
    """The eval block of a suite; `seed`: the training seed whose initial states it uses
    (eval.initial_states per_seed; study.state_start). Shared initial states: the block has no
    state keys of its own (Meta-World: eval.metaworld.seed, LIBERO: init states from 0)."""
    e = cfg["eval"]
    blk = {
        "suite": suite,
        "num_envs": e["num_envs"],
        "episodes_per_task": e["episodes_per_task"],
        "videos_per_task": e.get("videos_per_task", EvalSettings.videos_per_task),
        "center_crop": e.get("center_crop", EvalSettings.center_crop),
        "pipeline_groups": e.get("pipeline_groups", EvalSettings.pipeline_groups),
        "image_size": cfg["data"]["image_size"],
        "unnorm_dataset": suite,
        "stats_path": str(Path(job_output(cfg, "cache", suite)) / "dataset_statistics.json"),
    }
    if cfg["world"] == "metaworld":
        mw = cfg["data"]["metaworld"]
        blk.update(
            tasks=mw["datasets"][suite],
            camera=mw["camera"],
            render_size=mw["render_size"],
            instructions=mw.get("instructions") or {},
            **(e.get("metaworld") or {}),
        )
    else:
        blk.update(**(e.get("libero") or {}))
    if per_seed_states(cfg) and seed is not None:
        first = state_start(cfg, seed)
        blk["seed" if cfg["world"] == "metaworld" else "first_init_state"] = first
        blk["state_block"] = int(seed)
    return blk


# ----------------------------------------------------------------------------- stage configs


# Where each stage job's outputs live: `{job_dir}/{config id}/` (a file `{config id}.json` for an
# eval), so two configurations never share a path (docs/DEVELOPMENT.md, "A result's identity is its
# path"). The folder names the job for a reader; only the id folder below it is ever written by a job.
def job_dir(cfg: dict, stage: str, key: str) -> Path:
    lay, base = layout(cfg), cfg["model"]["base"]
    if stage == "eval":
        run, suite = key.rsplit("@", 1)
        return lay.eval(run) / suite
    if stage == "forgetting":
        return lay.eval(key) / "forgetting"
    return {
        "demos": lambda: lay.rlds(key),
        "cache": lambda: lay.cache(key),
        "model": lambda: lay.model(key),
        "probe": lambda: lay.probe(base, key),
        "icsm": lambda: lay.icsm(base, key),
        "craft_anchors": lambda: lay.craft(base, key),
        "train": lambda: lay.run(key),
    }[stage]()


def job_output(cfg: dict, stage: str, key: str) -> str:
    """The output folder (eval / forgetting: file) of one stage job, id included."""
    sc = _stage_config_cached(cfg, stage, key)
    return sc.get("out_dir") or sc["out_file"]


def stage_config(cfg: dict, stage: str, key: str) -> dict:
    """The config file content of one stage job (see module doc). Its own output path is
    `job_dir(...)/{its config id}`; the paths of its inputs carry their ids the same way."""
    out = _base(cfg, stage)
    d = cfg["data"]
    own = OUT_TAG  # the job's own output path, filled in once its id is known
    if stage == "demos":
        mw = d["metaworld"]
        out.update(
            dataset=key,
            tasks=mw["datasets"][key],
            instructions=mw.get("instructions") or {},
            camera=mw["camera"],
            render_size=mw["render_size"],
            max_steps=mw["max_steps"],
            episodes_per_task=mw["episodes_per_task"],
            seed=mw["seed"],
            workers=mw.get("workers", DemosStageSettings.workers),
            out_dir=own,
        )
    elif stage == "cache":
        out.update(
            dataset=key,
            rlds_dir=rlds_dir(cfg, key),
            image_size=d["image_size"],
            train_split=d.get("train_split", CacheStageSettings.train_split),
            heldout=d.get("heldout", CacheStageSettings.heldout),
            image_key=d.get("image_key", CacheStageSettings.image_key),
            state_key=d.get("state_key", CacheStageSettings.state_key),
            out_dir=own,
            # our Meta-World demos: the identity transform; other datasets: by name
            # (data/transforms.py DATASET_TRANSFORMS, openvla's per-dataset registry)
            transform="metaworld" if dataset_tasks(cfg, key) is not None else None,
        )
    elif stage == "model":
        out.update(model=_model_block(cfg, own=True), out_dir=own)
        if cfg["model"]["backend"] == "tiny":
            mw = d.get("metaworld") or {}
            out.update(
                tiny=cfg["model"]["tiny"],
                pretrain=cfg["model"]["pretrain"],
                upstream=_dataset_block(cfg, tiny_pretrain_dataset(cfg)),
                corpus_datasets=[_dataset_block(cfg, s) for s in tiny_corpus_datasets(cfg)],
                instructions=mw.get("instructions") or {},
            )
            extra = list((cfg["model"]["pretrain"] or {}).get("vqa_datasets") or [])
            if set(extra) - set(tiny_corpus_datasets(cfg)):  # their caches are the model job's inputs
                raise ConfigError(
                    f"model.pretrain.vqa_datasets {sorted(set(extra) - set(tiny_corpus_datasets(cfg)))} "
                    f"are not datasets of this study (its suites and the pretraining dataset: "
                    f"{tiny_corpus_datasets(cfg)})"
                )
    elif stage == "probe":
        out.update(
            model=_model_block(cfg),
            dataset=_dataset_block(cfg, cfg["probe"]["dataset"]),
            n=cfg["probe"]["n"],
            seed=cfg["probe"].get("seed", ProbeStageSettings.seed),
            split=cfg["probe"].get("split", ProbeStageSettings.split),
            trained_suites=trained_suites(cfg),
            batch_size=cfg["probe"].get("batch_size", ProbeStageSettings.batch_size),
            out_dir=own,
        )
    elif stage == "icsm":
        out.update(
            model=_model_block(cfg),
            icsm=cfg["icsm"],
            probe_dir=job_output(cfg, "probe", probe_set_name(cfg)),
            out_dir=own,
        )
    elif stage == "craft_anchors":
        suite, shots, shots_seed = parse_anchor_set(key)
        out.update(
            model=_model_block(cfg),
            craft=cfg["craft"],
            dataset=_dataset_block(cfg, suite),
            shots=shots,
            shots_seed=shots_seed,
            seed=cfg.get("seed", CraftAnchorsStageSettings.seed),
            out_dir=own,
        )
    elif stage == "train":
        r = parse_run_name(key)
        mcfg = method_config(cfg, r["method"])
        needs = method_needs(mcfg)
        out.update(
            run_name=key,
            method_name=r["method"],
            suite=r["suite"],
            shots=parse_shots(r["shots"]),
            seed=r["seed"],
            model=_model_block(cfg),
            dataset=_dataset_block(cfg, r["suite"]),
            train=cfg["train"],
            method=mcfg,
            out_dir=own,
        )
        ps = probe_set_name(cfg)
        out["icsm_dir"] = job_output(cfg, "icsm", ps) if "icsm" in needs else None
        out["probe_dir"] = job_output(cfg, "probe", ps) if "probe" in needs else None
        out["craft_dir"] = (
            job_output(cfg, "craft_anchors", anchor_set(r["suite"], out["shots"], r["seed"]))
            if "craft" in needs
            else None
        )
        if "craft" in needs:
            out["craft_layer"] = cfg["craft"].get(
                "layer", CraftAnchorSettings.layer
            )  # checked against the anchor cache
        parts = codedeps.train_code_parts(out)  # only the plug-ins (and periodic eval) this run uses
        code, files = codedeps.stage_code("train", parts)
        out.update(code=code, code_files=dict(files))
        if cfg["train"].get("eval_every"):
            out["periodic_eval"] = eval_block(cfg, r["suite"], r["seed"])
        prev = chain_previous(cfg, key)
        if prev:  # a chain stage: continue training the previous stage's adapter (only then: run ids)
            out["init_adapter"] = str(Path(job_output(cfg, "train", prev)) / "final")
            if out["train"].get("init_adapter") or out["train"].get("init_step") is not None:
                # train.init_adapter / init_step start the chain's first stage only
                out["train"] = {**out["train"], "init_adapter": None, "init_step": None}
        elif cfg["train"].get("init_adapter"):  # the user's adapter: its files' hashes are in the run id
            out["init_adapter_files"] = init_adapter_files(cfg["train"]["init_adapter"])
    elif stage == "eval":
        run, suite = key.rsplit("@", 1)
        out.update(
            run_name=run,
            suite=suite,
            model=_model_block(cfg),
            adapter_dir=None if is_teacher(run) else str(Path(job_output(cfg, "train", run)) / "final"),
            eval=eval_block(cfg, suite, run_seed(run)),
            out_file=own,
        )
    elif stage == "forgetting":
        f = cfg["eval"].get("forgetting", {})
        ps = probe_set_name(cfg)
        out.update(
            run_name=key,
            model=_model_block(cfg),
            adapter_dir=None if key == "teacher" else str(Path(job_output(cfg, "train", key)) / "final"),
            probe_dir=job_output(cfg, "probe", ps),
            icsm_dir=job_output(cfg, "icsm", ps),
            vqa_jsonl=f.get("vqa_jsonl")
            or (str(libero_vqa_dir(cfg) / "questions.jsonl") if f.get("libero_vqa") else None),
            vqa_categories=list(f.get("vqa_categories") or []),
            drift_samples=f.get("drift_samples", ForgettingSettings.drift_samples),
            craft_layer=(cfg.get("craft") or {}).get(
                "layer", CraftAnchorSettings.layer
            ),  # drift / CKA at CRaFT's layer
            vqa_datasets=[_dataset_block(cfg, s) for s in f.get("upstream_suites", [])]
            if cfg["world"] == "metaworld"
            else [],
            out_file=own,
        )
        down = list(f.get("downstream_vqa_suites") or []) if cfg["world"] == "metaworld" else []
        if down:  # only when configured: the stage configs (ids) of studies without it are unchanged
            unknown = sorted(set(down) - set(suites_all(cfg)))
            if unknown:
                raise ConfigError(
                    f"eval.forgetting.downstream_vqa_suites {unknown} are not suites of this study "
                    f"({suites_all(cfg)})"
                )
            out["vqa_downstream_datasets"] = [_dataset_block(cfg, s) for s in down]
    else:
        raise ConfigError(f"unknown stage '{stage}'")
    out["inputs"] = stage_inputs(cfg, stage, key)
    return _place(out, job_dir(cfg, stage, key), key)


def _place(out: dict, where: Path, key: str) -> dict:
    """Put a stage config's outputs at `where/{its config id}`: the id is taken with its own output
    path written `{out}` (io.config_id), so filling the path in keeps the id."""
    cid = config_id(out)
    path = str(where / (f"{cid}.json" if out.get("out_file") == OUT_TAG else cid))

    def fill(x):
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fill(v) for v in x]
        if isinstance(x, str) and (x == OUT_TAG or x.startswith(OUT_TAG + "/")):
            return path + x[len(OUT_TAG) :]
        return x

    out = fill(out)
    if out["stage"] == "train":
        # the run id names the run's checkpoints; the data root is factored out, so moving the root
        # keeps it (io.config_id). Checkpoints are shared by the configs of one run id (a constant-LR
        # run to N steps is the first N steps of one to M > N): raising max_steps continues the run.
        out["run_id"] = run_id_of(out, key)
        out["ckpt_dir"] = str(where / "checkpoints" / out["run_id"])
    return out


def stage_inputs(cfg: dict, stage: str, key: str) -> dict:
    """{input name: {file, id, rule}}: the completion file of each input and the config id it must
    record for this job (freshness.check_inputs compares them when the job starts)."""
    out = {}
    for name, up_stage, up_key in upstream(cfg, stage, key):
        sc = _stage_config_cached(cfg, up_stage, up_key)
        out[name] = {
            "file": str(completion_file(sc)),
            "id": config_id(sc),
            "rule": COMPLETION[up_stage][0],
        }
    return out


_SC_CACHE: dict = {}


def _stage_config_cached(cfg: dict, stage: str, key: str) -> dict:
    """stage_config memoised on the config's content (the DAG asks for the model's id per job)."""
    k = (
        stage,
        key,
        str(codedeps.PKG_DIR),
        json.dumps(cfg, sort_keys=True, default=str),
        os.environ.get("VLAFORGET_ROOT"),
        os.environ.get("VLAFORGET_ALLOWED_ROOT"),
    )
    if k not in _SC_CACHE:
        if len(_SC_CACHE) > 4096:
            _SC_CACHE.clear()
        _SC_CACHE[k] = stage_config(cfg, stage, key)
    return _SC_CACHE[k]


def stage_configs(cfg: dict) -> dict[tuple[str, str], dict]:
    """Every stage job's stage config (ids and paths included), upstream first (study.stage_jobs)."""
    return {job: stage_config(cfg, *job) for job in stage_jobs(cfg)}
