"""Config checks that used to fail hours into the DAG, made at config time (issue 17, item 6).

`late_checks(cfg)` (inside config.validate, so < 1 s and before any job): suite names known, no empty
dataset / task list, `train.lora.layers` well formed and in range for the model.
`data_checks(cfg)` (the workflow at parse time; errors on a real run, warnings on a dry-run, which must
work on a fresh clone without the data): data.rlds_dir and each suite's builder dir exist,
eval.forgetting.vqa_jsonl / eval.libero.config_path exist and lie under the allowed root, probe.n is
not larger than the probe dataset.
Each message names the key, the bad value and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import ConfigError
from .paths import Layout, PathPolicyError, check_under, resolve_allowed_root, resolve_root

# decoder layers of the supported OpenVLA base (Llama-2-7B); the tiny backend says model.tiny.layers
OPENVLA_LAYERS = 32
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


def _err(msg: str):
    return ConfigError(msg)


def _hint(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def known_datasets(cfg: dict) -> list[str] | None:
    """Dataset names the config can build (metaworld: data.metaworld.datasets); None = LIBERO (any
    builder dir under data.rlds_dir, checked by data_checks)."""
    if cfg["world"] == "metaworld":
        return list((cfg["data"].get("metaworld") or {}).get("datasets") or {})
    return None


def suite_keys(cfg: dict) -> list[tuple[str, str]]:
    """(config key, suite name) of every place a suite is named."""
    st, out = cfg["study"], []
    out += [("study.suites", s) for s in st.get("suites") or []]
    for k in ("fewshot_suite", "ablation_suite"):
        if st.get(k):
            out.append((f"study.{k}", st[k]))
    if cfg["probe"].get("dataset"):
        out.append(("probe.dataset", cfg["probe"]["dataset"]))
    for s in (cfg["eval"].get("forgetting") or {}).get("upstream_suites") or []:
        out.append(("eval.forgetting.upstream_suites", s))
    mw = cfg["data"].get("metaworld") or {}
    if cfg["world"] == "metaworld" and mw.get("upstream"):
        out.append(("data.metaworld.upstream", mw["upstream"]))
    return out


def num_layers(cfg: dict) -> int | None:
    m = cfg["model"]
    if m["backend"] == "tiny":
        return int((m.get("tiny") or {}).get("layers", 0)) or None
    if m["backend"] == "openvla":
        return OPENVLA_LAYERS
    return None


def check_lora_layers(layers, n: int | None, key: str = "train.lora.layers") -> None:
    if layers in (None, "all"):
        return
    fix = f"use 'all' or [first, last] (inclusive, 0-based{f', last <= {n - 1}' if n else ''})"
    if (
        not isinstance(layers, (list, tuple))
        or len(layers) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
    ):
        raise _err(f"{key} = {layers!r} is malformed: {fix}")
    lo, hi = layers
    if lo < 0 or hi < lo or (n is not None and hi >= n):
        raise _err(f"{key} = {list(layers)} is out of range for a model with {n} decoder layers: {fix}")


def late_checks(cfg: dict) -> None:
    known = known_datasets(cfg)
    mw = cfg["data"].get("metaworld") or {}
    if cfg["world"] == "metaworld":
        for name, tasks in (mw.get("datasets") or {}).items():
            if not tasks:
                raise _err(
                    f"data.metaworld.datasets.{name} is an empty task list: list its Meta-World "
                    f"tasks (e.g. [drawer-open-v3]) or remove the dataset"
                )
    if not cfg["study"].get("suites"):
        raise _err(
            "study.suites is empty: list the suites to fine-tune on "
            f"(known: {', '.join(known) if known else 'the datasets under data.rlds_dir'})"
        )
    st = cfg["study"]
    for key, runs_of in (("seeds", ("methods", "fewshot_methods")), ("ablation_seeds", ("ablations",))):
        if any(st.get(k) for k in runs_of) and key in st and not st.get(key):
            # an empty seed list trains nothing: the tables would silently hold the teacher alone
            raise _err(
                f"study.{key} is empty: list at least one seed (e.g. [42]), or empty "
                f"study.{' / study.'.join(runs_of)} to run none of those runs"
            )
    for key, s in suite_keys(cfg):
        if known is not None and s not in known:
            raise _err(
                f"{key} names '{s}', which is not a dataset of this config (data.metaworld.datasets: "
                f"{', '.join(known)}).{_hint(s, known)}"
            )
        if known is None and not any(s == p or s.startswith(p + "_") for p in LIBERO_SUITES):
            raise _err(
                f"{key} names '{s}', which is not a LIBERO suite ({', '.join(LIBERO_SUITES)}, "
                f"optionally with a suffix like _no_noops).{_hint(s, [p + '_no_noops' for p in LIBERO_SUITES])}"
            )
    check_lora_layers((cfg["train"].get("lora") or {}).get("layers", "all"), num_layers(cfg))
    allowed = resolve_allowed_root(cfg)
    for key, p in optional_paths(cfg):  # existence: data_checks (the data may not be on this machine)
        try:
            check_under(p, allowed, key)
        except PathPolicyError as e:
            raise _err(str(e)) from e


def optional_paths(cfg: dict) -> list[tuple[str, str]]:
    f = cfg["eval"].get("forgetting") or {}
    lib = cfg["eval"].get("libero") or {}
    return [
        (k, p)
        for k, p in (
            ("eval.forgetting.vqa_jsonl", f.get("vqa_jsonl")),
            ("eval.libero.config_path", lib.get("config_path")),
        )
        if p
    ]


def _probe_capacity(cfg: dict) -> tuple[int, str] | None:
    """Transitions in the probe dataset's `probe.split`: from its cache if built, else an upper bound
    from the demos config (metaworld; the split as data.heldout makes it)."""
    import json

    from .data.cache import n_heldout_of_task, n_train_episodes, split_episodes

    ds = cfg["probe"].get("dataset")
    if not ds:
        return None
    split = cfg["probe"].get("split", "heldout")
    manifest = Layout(resolve_root(cfg)).cache(ds) / "manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            eps = split_episodes(m, json.loads((manifest.parent / "episodes.json").read_text()), split)
            return sum(int(e["length"]) for e in eps), f"its cache {manifest.parent}, split {split}"
        except (OSError, ValueError, KeyError):
            return None
    mw = cfg["data"].get("metaworld") or {}
    if cfg["world"] == "metaworld" and ds in (mw.get("datasets") or {}):
        per, n_tasks = int(mw["episodes_per_task"]), len(mw["datasets"][ds])
        ts = float(cfg["data"].get("train_split", 0.95))
        if cfg["data"].get("heldout", "per_task") == "tail":
            n_train = n_train_episodes(per * n_tasks, ts)
        else:
            n_train = n_tasks * (per - n_heldout_of_task(per, ts))
        n_eps = {"train": n_train, "heldout": per * n_tasks - n_train}.get(split, per * n_tasks)
        return n_eps * int(mw["max_steps"]), (
            f"data.metaworld episodes_per_task x tasks x max_steps, split {split}"
        )
    return None


def data_checks(cfg: dict) -> list[str]:
    """Problems with the data the config points at (cause + fix each); [] when all is there."""
    problems: list[str] = []
    allowed = resolve_allowed_root(cfg)
    rlds = cfg["data"].get("rlds_dir")
    if cfg["world"] == "libero" and not cfg["data"].get("fixture"):  # a fixture is written by its own rule
        if not rlds or not Path(rlds).is_dir():
            problems.append(
                f"data.rlds_dir = {rlds} does not exist: point it at the folder holding the "
                f"modified_libero_rlds builder dirs (e.g. libero_spatial_no_noops/1.0.0/)"
            )
        else:
            for key, s in suite_keys(cfg):
                d = Path(rlds) / s
                if not d.is_dir():
                    have = sorted(p.name for p in Path(rlds).iterdir() if p.is_dir())
                    problems.append(
                        f"{key} names '{s}' but {d} does not exist (data.rlds_dir holds: "
                        f"{', '.join(have) or 'nothing'}).{_hint(s, have)}"
                    )
    f = cfg["eval"].get("forgetting") or {}
    lib = cfg["eval"].get("libero") or {}
    for key, p in (
        ("eval.forgetting.vqa_jsonl", f.get("vqa_jsonl")),
        ("eval.libero.config_path", lib.get("config_path")),
    ):
        if not p:
            continue
        try:
            check_under(p, allowed, key)
        except PathPolicyError as e:
            problems.append(str(e))
            continue
        if not Path(p).exists():
            problems.append(f"{key} = {p} does not exist: fix the path or remove the key")
    cap = _probe_capacity(cfg)
    n = int(cfg["probe"].get("n", 0))
    if cap is not None and n > cap[0]:
        problems.append(
            f"probe.n = {n} but the probe dataset '{cfg['probe']['dataset']}' has at most "
            f"{cap[0]} transitions ({cap[1]}): lower probe.n to <= {cap[0]}"
        )
    return problems
