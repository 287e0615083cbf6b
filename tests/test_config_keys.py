"""One source per config key (issue 30.2): each typed block's dataclass in vlaforget.settings holds the
key's type, default and one-line doc; the schema, config/config.yaml and config/README.md are checked
against it here, so a key added, renamed or re-defaulted in one place and not the others fails."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

from vlaforget import settings
from vlaforget.config import SCHEMA_PATH
from vlaforget.settings import STUDY_BLOCKS

REPO = Path(__file__).resolve().parents[1]

# config/config.yaml values that differ from the dataclass default on purpose: (block, key) -> reason.
# Required keys (no default) are the study's by definition and not listed.
STUDY_OVERRIDES = {
    (
        "model",
        "path",
    ): "the real study's base model (openvla/openvla-7b); the default null is the tiny backend's",
    ("methods.*.hsw", "enabled"): "a method switches its own block on (every block is off by default)",
    ("methods.*.thermostat", "enabled"): "a method switches its own block on",
    ("methods.*.craft", "enabled"): "a method switches its own block on",
    ("methods.*.craft", "anchor"): "named explicitly: the same pooling the default (the anchor cache's own, "
    "craft.pooling) gives",
    ("methods.*.craft", "anchor_batch_size"): "the seeds' craft.anchor_batch_size 8, independent of the "
    "micro-batch (the default null = the micro-batch)",
}


def _node(schema: dict, where: str) -> dict:
    """The schema node of a typed block (methods.*.X: the method definition's X)."""
    parts = where.split(".")
    if parts[0] == "methods":
        node = schema["definitions"]["method"]
        parts = parts[2:]
    else:
        node = schema
    for p in parts:
        node = node["properties"][p]
    return node


def _json_types(node: dict) -> set[str] | None:
    """The JSON types a schema property allows (None: any)."""
    if "type" in node:
        t = node["type"]
        return set([t] if isinstance(t, str) else t)
    if "enum" in node:
        return {
            {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}[type(v)]
            for v in node["enum"]
        }
    if "oneOf" in node:
        return set().union(*(_json_types(n) or set() for n in node["oneOf"]))
    if "$ref" in node:
        return {"array"}  # the shared lists (definitions.strlist / intlist)
    return None


def _hint_types(hint: Any) -> set[str] | None:
    """The JSON types a dataclass annotation accepts (None: Any)."""
    origin = typing.get_origin(hint)
    if origin in (Union, getattr(types, "UnionType", Union)):
        out = set()
        for a in typing.get_args(hint):
            t = _hint_types(a)
            if t is None:
                return None
            out |= t
        return out
    if hint is Any:
        return None
    if origin is tuple:
        return {"array"}
    if dataclasses.is_dataclass(hint) or hint is dict:
        return {"object"}
    return {{int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null"}[hint]}


@pytest.mark.parametrize("where", list(STUDY_BLOCKS))
def test_schema_has_every_typed_key_of_the_same_type(where):
    """Every field of a typed block has a schema property of the matching JSON type, and every schema
    property of the block is a field."""
    cls = STUDY_BLOCKS[where]
    node = _node(yaml.safe_load(SCHEMA_PATH.read_text()), where)
    assert node.get("additionalProperties") is False, where
    props = node["properties"]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(props) == fields, (where, sorted(set(props) ^ fields))
    hints = typing.get_type_hints(cls)
    bad = []
    for name in sorted(fields):
        want, have = _hint_types(hints[name]), _json_types(props[name])
        if want is None:  # Any: the schema states the shape (e.g. lists or a word)
            continue
        # a number field takes an integer too (settings._check converts it)
        if have is None or not (
            have == want or (want - {"integer"} == have - {"integer"} and "number" in want)
        ):
            bad.append(f"{where}.{name}: schema {sorted(have or ['anything'])} vs dataclass {sorted(want)}")
    assert not bad, "\n".join(bad)
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    if where in ("model",):  # the study config must name them; the other blocks' required keys come
        assert set(node.get("required", [])) == required  # from config.yaml, which every overlay extends


def test_schema_has_no_duplicate_key():
    """yaml.safe_load keeps the last of a repeated key silently (the train block once had
    lora_input_cast four times)."""

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        keys = [loader.construct_object(k) for k, _ in node.value]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        assert not dup, f"config.schema.yaml line {node.start_mark.line + 1}: repeated key(s) {dup}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    yaml.load(SCHEMA_PATH.read_text(), Loader=Strict)


def test_every_typed_key_has_a_one_line_doc():
    for where, cls in STUDY_BLOCKS.items():
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            assert doc and "\n" not in doc, f"{where}.{f.name} has no one-line doc (settings.key)"


def _config_blocks(cfg: dict):
    """(where, block dict) of each typed block config/config.yaml sets."""
    for where in STUDY_BLOCKS:
        parts = where.split(".")
        if parts[0] == "methods":
            for m in cfg["methods"].values():
                if (m or {}).get(parts[2]) is not None:
                    yield where, m[parts[2]]
            continue
        node = cfg
        for p in parts:
            node = (node or {}).get(p)
        if node is not None:
            yield where, node


def test_config_yaml_values_equal_the_defaults():
    """config/config.yaml (what users ran) sets each typed key to its default, or the key is a listed
    study override: the two cannot drift apart again (train.precision, image_aug, save_steps,
    num_workers, early_stopping_min_delta and lora.targets did)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    seen, drift = set(), []
    for where, block in _config_blocks(cfg):
        cls = STUDY_BLOCKS[where]
        for name, value in block.items():
            if isinstance(value, dict) and f"{where}.{name}" in STUDY_BLOCKS:
                continue  # a nested typed block: checked on its own
            try:
                default = cls.default(name)
            except KeyError:
                continue  # required: the study's own value
            default = list(default) if isinstance(default, tuple) else default
            seen.add((where, name))
            if value != default and (where, name) not in STUDY_OVERRIDES:
                drift.append(f"{where}.{name}: config.yaml {value!r}, settings.py default {default!r}")
    assert not drift, "\n".join(drift)
    stale = set(STUDY_OVERRIDES) - seen
    assert not stale, f"listed overrides config.yaml no longer sets: {sorted(stale)}"


def test_config_yaml_defaults_are_typed_and_valid():
    """Each typed block of config/config.yaml builds its settings object."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for where, block in _config_blocks(cfg):
        if where != "methods.*.craft" or "epsilon" in block:  # `craft` is also the anchor block's name
            STUDY_BLOCKS[where].of(block, where)


def test_readme_tables_are_the_generated_ones():
    """config/README.md's key tables equal `vlaforget config-doc` (regenerate: vlaforget config-doc
    --write config/README.md)."""
    text = (REPO / "config" / "README.md").read_text()
    assert settings.readme_with_doc(text) == text, "run: vlaforget config-doc --write config/README.md"
    for where, cls in STUDY_BLOCKS.items():
        for f in dataclasses.fields(cls):
            assert re.search(rf"\| `{f.name}` \|", text), f"{where}.{f.name} is not in config/README.md"


def test_config_doc_command_rewrites_only_its_section(tmp_path):
    from vlaforget.cli import main

    p = tmp_path / "README.md"
    p.write_text(f"intro\n{settings.README_BEGIN}\nstale\n{settings.README_END}\noutro\n")
    assert main(["config-doc", "--write", str(p)]) == 0
    out = p.read_text()
    assert out.startswith("intro\n") and out.endswith("outro\n") and "stale" not in out
    assert "| `precision` | str | `bf16` |" in out


def test_doc_metadata_is_in_no_stage_config_or_id():
    """The doc is field metadata: asdict (what a recipe might write back) and equality ignore it."""
    ts = settings.TrainSettings.of({"max_steps": 2, "batch_size": 1, "lr": 1e-3, "lora": {"r": 2}})
    assert "doc" not in str(dataclasses.asdict(ts))
    assert ts == settings.TrainSettings.of({"max_steps": 2, "batch_size": 1, "lr": 1e-3, "lora": {"r": 2}})


def test_model_block_is_typed():
    m = settings.ModelSettings.of(
        {"backend": "tiny", "base": "t", "tiny": {"layers": 4}, "pretrain": {"steps": 3}}
    )
    assert m.dtype == settings.DEFAULT_MODEL_DTYPE == "bf16" and m.pretrain.steps == 3 and m.path is None
    with pytest.raises(ValueError, match=r"model: unknown key\(s\) \['dtpye'\]"):
        settings.ModelSettings.of({"backend": "tiny", "base": "t", "dtpye": "fp32"})
    with pytest.raises(ValueError, match=r"model.base is required"):
        settings.ModelSettings.of({"backend": "tiny"})
    with pytest.raises(ValueError, match=r"model.pretrain.steps = '3'"):
        settings.ModelSettings.of({"backend": "tiny", "base": "t", "pretrain": {"steps": "3"}})


# `.get(key, literal)` of a typed key's name that reads something other than a config block: an
# artifact a stage wrote (its own format, older files without the key), not a copied default
NOT_CONFIG_READS = {
    ("methods/thermostat.py", "sd.get('law', 'calibrated')"),  # a checkpoint's controller state
    ("stages/icsm.py", "probe.get('seed', 0)"),  # probe.pt
    ("validation.py", "(m.get('tiny') or {}).get('layers', 0)"),  # model.tiny: sizes, no defaults
    # validation sits below settings (tests/test_layering.py); train.lora.layers is "all" in config.yaml
    ("validation.py", "(cfg['train'].get('lora') or {}).get('layers', 'all')"),
}


def test_no_default_is_copied_as_a_literal():
    """`block.get("<typed key>", <literal>)` outside settings.py copies a default that can drift (the
    plan, the speed settings and export read train / model defaults that way): read the class."""
    import ast

    names = {f.name for cls in STUDY_BLOCKS.values() for f in dataclasses.fields(cls)}
    pkg = REPO / "src" / "vlaforget"
    found = []
    for p in sorted(pkg.rglob("*.py")):
        if p.name == "settings.py":
            continue
        rel = p.relative_to(pkg).as_posix()
        for n in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and n.func.attr in ("get", "pop")
                and len(n.args) == 2
                and isinstance(n.args[0], ast.Constant)
                and n.args[0].value in names
                and isinstance(n.args[1], ast.Constant)
                and (rel, ast.unparse(n)) not in NOT_CONFIG_READS
            ):
                found.append(f"{rel}:{n.lineno}: {ast.unparse(n)}")
    assert not found, "\n".join(found)
