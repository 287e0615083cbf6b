"""The stage-config file: how a job's stage config is written and read (the stage contract).

The workflow writes each job's stage config (stageconfig.stage_config) with `stage_config_text` to
`{root}/configs/{stage}/{key}/{id}.yaml`; the stage command (`vlaforget <stage> --config FILE`) reads
it with `load_stage_config`, which fills in the data root the file now lies under, applies the
current values of the keys outside the id (NON_SEMANTIC_ENV) and refuses a file whose content is not
the id its name says. The stages import only this module of the config machinery, so how stage
configs are assembled is not part of any stage's code hash (the content it produces is the id).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from .errors import ConfigError
from .io import config_id, fill_root, relocatable
from .paths import PathPolicyError, check_under
from .semantics import non_semantic_keys

CONFIG_ID_RE = r"[0-9a-f]{12}"
# The current values of the keys an id leaves out (semantics.non_semantic_keys), as JSON: the workflow
# passes them to each job, so changing `train.log_every` neither rewrites a stage-config file nor
# reruns a job, and the next run of that job reads the new value.
NON_SEMANTIC_ENV = "VLAFORGET_NON_SEMANTIC"


def stage_config_text(sc: dict) -> str:
    """The stage-config file of one job: its content with the data root written `{root}`, so a copied
    or moved root is read where it now is (load_stage_config fills it in)."""
    body = {k: v for k, v in sc.items() if k != "root"}
    return yaml.safe_dump({**relocatable(body, sc["root"]), "root": "{root}"}, sort_keys=True)


def non_semantic_values(sc: dict) -> dict:
    """{dotted key: value} of sc's keys that its id leaves out (what NON_SEMANTIC_ENV carries)."""
    out = {}
    for dotted in non_semantic_keys(sc):
        node, ok = sc, True
        for p in dotted.split("."):
            if not isinstance(node, dict) or p not in node:
                ok = False
                break
            node = node[p]
        if ok:
            out[dotted] = node
    return out


def _root_of_config_file(path: Path) -> Path | None:
    """{root} of a stage-config file at {root}/configs/{stage}/{key}/{id}.yaml (None: elsewhere)."""
    p = path.absolute()
    if re.fullmatch(CONFIG_ID_RE, p.stem) and len(p.parents) > 3 and p.parents[2].name == "configs":
        return p.parents[3]
    return None


def load_stage_config(path: str | Path, stage: str | None = None) -> dict:
    """Read a stage config file, re-check the path policy (a hand-edited file could escape) and, for
    a file the workflow wrote (`{root}/configs/{stage}/{key}/{id}.yaml`), refuse unless its content
    has the id its name says: a job only ever writes the output of the config its driver named."""
    path = Path(path)
    with open(path) as f:  # as written (YAML 1.1): a hex id like `5e1234` stays a string
        sc = yaml.safe_load(f) or {}
    if not isinstance(sc, dict):
        raise ConfigError(f"{path} is not a stage config (not a mapping)")
    if stage and sc.get("stage") != stage:
        raise ConfigError(f"{path} is a '{sc.get('stage')}' stage config, not '{stage}'")
    if sc.get("root") == "{root}":
        root = _root_of_config_file(path) or (
            Path(os.environ["VLAFORGET_ROOT"]) if os.environ.get("VLAFORGET_ROOT") else None
        )
        if root is None:
            raise ConfigError(
                f"{path} writes the data root as {{root}} but lies outside {{root}}/configs/: "
                "set VLAFORGET_ROOT to the data root it belongs to"
            )
        sc = fill_root(sc, str(root))
    for dotted, value in json.loads(os.environ.get(NON_SEMANTIC_ENV) or "{}").items():
        if dotted in non_semantic_values(sc):  # only keys outside the id
            node = sc
            parts = dotted.split(".")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value
    if re.fullmatch(CONFIG_ID_RE, path.stem):
        got = config_id(sc)
        if got != path.stem:
            raise ConfigError(
                f"{path} holds a config of id {got}, not the id {path.stem} its name says (edited by hand, or "
                f"written by another version of the code): refusing to run it. Delete the file; the workflow "
                f"writes it anew (rule stage_config)."
            )
    allowed = Path(sc.get("allowed_root", "/opt/data/private"))
    for k in ("root", "out_dir", "out_file"):
        if sc.get(k):
            try:
                check_under(sc[k], allowed, k)
            except PathPolicyError as e:
                raise ConfigError(str(e)) from e
    return sc


def check_code(sc: dict, path: Path | str = "the stage config") -> None:
    """Refuse a job whose package code is not the code its stage config (its id) was made for.

    The workflow hashes each stage's code into the config when it plans the DAG; a job starts later.
    An edit of src/ in between (Snakemake still running, a hand-run stage with an old config) would run
    the new code and file its output under the old id, where every later run takes it for the old
    code's result (seen in session 14: 15 evaluations written under ids of the code before a fix).
    For a job about to run (cli.run_stage), never for reading a finished one's config (export).
    """
    want = sc.get("code")
    if not want or not sc.get("stage"):
        return  # a hand-written config that records no code: nothing to compare
    from . import codedeps

    enabled = codedeps.train_code_parts(sc) if sc["stage"] == "train" else ()
    got, files = codedeps.stage_code(sc["stage"], enabled)
    if got == want:
        return
    changed = codedeps.changed_files(sc.get("code_files") or {}, files)
    raise ConfigError(
        f"{path}: the {sc['stage']} stage's code changed since this config was written (code {want} "
        f"then, {got} now; changed: {', '.join(changed) or 'unknown (no code_files recorded)'}): its "
        f"output would be filed under the old code's id. Nothing was run. Run the workflow again "
        f"(snakemake plans the job under the new code's id; editing the package while Snakemake runs "
        f"does this), or restore the code the config was made for."
    )
