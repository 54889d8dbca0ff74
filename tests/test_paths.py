"""The one rule for paths in configs (`distill.config.resolve_path`): relative to the working
directory. Every path field of every stage's config, written in a config file in one folder and
loaded from another working directory, resolves by that rule; a missing input path is one line
naming the field and the path as resolved; a config distill writes means the same when it is
read back from anywhere."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import AfterValidator, BaseModel

from distill.config import _data_source, _input_path, load_config, resolve_path, save_config
from distill.errors import DistillError
from distill.eval.config import EvalConfig
from distill.traces.generate import GenerateConfig
from distill.train.config import TrainConfig

BASE = {
    GenerateConfig: {"prompts": {"source": "synthetic"},
                     "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                                 "model": "served-name"}},
    TrainConfig: {"student": {"init": "/dev/null"}, "data": {"traces": ["/dev/null"]}},
    EvalConfig: {"prompts": {"source": "synthetic"}, "models": [{"model": "/dev/null"}]},
}
JAX_TEACHER = {"kind": "jax", "model": "/dev/null"}

# (schema, dotted key, the config as a dict given the relative value, input (read) or output)
FIELDS = [
    (GenerateConfig, "prompts.source", lambda v: {"prompts": {"source": v}}, "input"),
    (GenerateConfig, "teacher.model", lambda v: {"teacher": {**JAX_TEACHER, "model": v}}, "input"),
    (GenerateConfig, "teacher.tokenizer", lambda v: {"teacher": {**JAX_TEACHER, "tokenizer": v}},
     "input"),
    (GenerateConfig, "filters.decontaminate.0", lambda v: {"filters": {"decontaminate": [v]}},
     "input"),
    (GenerateConfig, "output.root", lambda v: {"output": {"root": v}}, "output"),
    (TrainConfig, "student.init", lambda v: {"student": {"init": v}}, "input"),
    (TrainConfig, "student.tokenizer", lambda v: {"student": {"init": "/dev/null",
                                                              "tokenizer": v}}, "input"),
    (TrainConfig, "data.traces.0", lambda v: {"data": {"traces": [v]}}, "input"),
    (TrainConfig, "data.traces.0.source", lambda v: {"data": {"traces": [{"source": v}]}},
     "input"),
    (TrainConfig, "data.cache_dir", lambda v: {"student": {"init": "/dev/null"},
                                               "data": {"traces": ["/dev/null"], "cache_dir": v}},
     "output"),
    (TrainConfig, "output_root", lambda v: {"output_root": v}, "output"),
    (TrainConfig, "onpolicy.teacher.model", lambda v: {"onpolicy": {
        "prompts": {"source": "synthetic"}, "teacher": {**JAX_TEACHER, "model": v}}}, "input"),
    (TrainConfig, "onpolicy.teacher.tokenizer", lambda v: {"onpolicy": {
        "prompts": {"source": "synthetic"}, "teacher": {**JAX_TEACHER, "tokenizer": v}}},
     "input"),
    (EvalConfig, "prompts.source", lambda v: {"prompts": {"source": v}}, "input"),
    (EvalConfig, "models.0.model", lambda v: {"models": [{"model": v}]}, "input"),
    (EvalConfig, "models.0.tokenizer", lambda v: {"models": [{"model": "/dev/null",
                                                               "tokenizer": v}]}, "input"),
    (EvalConfig, "models.0.metrics", lambda v: {"models": [{"model": "/dev/null",
                                                             "metrics": v}]}, "input"),
    (EvalConfig, "kl.traces", lambda v: {"kl": {"traces": v}}, "input"),
    (EvalConfig, "kl.traces.source", lambda v: {"kl": {"traces": {"source": v}}}, "input"),
    (EvalConfig, "benchmark.source",
     lambda v: {"prompts": None, "benchmark": {"name": "math500", "source": v}}, "input"),
    (EvalConfig, "kl.tokenizer", lambda v: {"kl": {"traces": "/dev/null", "tokenizer": v}},
     "input"),
    (EvalConfig, "output", lambda v: {"output": v}, "output"),
]
IDS = [f"{schema.__name__}:{key}" for schema, key, _, _ in FIELDS]


def lookup(cfg: BaseModel, key: str):
    node = cfg
    for part in key.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """(the config's folder, the working directory: another folder)."""
    config_dir, cwd = tmp_path / "configs", tmp_path / "elsewhere"
    config_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return config_dir, cwd


def write(config_dir: Path, schema, change: dict) -> Path:
    data = {**BASE[schema], **change}
    path = config_dir / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("schema, key, config, kind", FIELDS, ids=IDS)
def test_a_relative_path_is_relative_to_the_working_directory(folders, schema, key, config, kind):
    config_dir, cwd = folders
    (config_dir / "data").mkdir()  # the same name beside the config: not what the rule picks
    (cwd / "data").mkdir()
    (cwd / "data" / "thing.jsonl").write_text("{}\n")
    path = write(config_dir, schema, config("data/thing.jsonl"))
    cfg = load_config(schema, path, check_paths=True)
    assert lookup(cfg, key) == str(cwd / "data" / "thing.jsonl")
    # `~` is the home directory; `..` is resolved
    home = load_config(schema, write(config_dir, schema, config("~/data/../thing.jsonl")))
    assert lookup(home, key) == str(Path.home() / "thing.jsonl")


@pytest.mark.parametrize("schema, key, config, kind", FIELDS, ids=IDS)
def test_a_missing_input_path_is_one_line_naming_the_field_and_the_resolved_path(
        folders, schema, key, config, kind):
    config_dir, cwd = folders
    path = write(config_dir, schema, config("nowhere/thing.jsonl"))
    if kind == "output":  # written, not read: nothing has to be there yet
        assert lookup(load_config(schema, path, check_paths=True), key) == str(
            cwd / "nowhere" / "thing.jsonl")
        return
    with pytest.raises(DistillError) as e:
        load_config(schema, path, check_paths=True)
    assert str(e.value) == f"{path}: {key}: not found: {cwd / 'nowhere' / 'thing.jsonl'}"
    # `distill plan` loads without asking for inputs: the path is resolved all the same
    assert lookup(load_config(schema, path), key) == str(cwd / "nowhere" / "thing.jsonl")


def test_a_set_override_follows_the_same_rule(folders):
    config_dir, cwd = folders
    path = write(config_dir, TrainConfig, {})
    cfg = load_config(TrainConfig, path, ["data.traces=[teacher_traces/run-a]"])
    assert cfg.data.traces == [str(cwd / "teacher_traces" / "run-a")]


def test_output_roots_default_to_the_working_directory(folders):
    config_dir, cwd = folders
    assert load_config(TrainConfig, write(config_dir, TrainConfig, {})).output_root == str(
        cwd / "students")
    assert load_config(GenerateConfig, write(config_dir, GenerateConfig, {})).output.root == str(
        cwd / "teacher_traces")


def test_a_prompt_source_is_a_hub_name_unless_something_is_there(folders):
    config_dir, cwd = folders
    name = "open-r1/OpenR1-Math-220k"
    path = write(config_dir, EvalConfig, {"prompts": {"source": name}})
    assert load_config(EvalConfig, path, check_paths=True).prompts.source == name
    (cwd / name).mkdir(parents=True)  # a local copy under that name wins
    assert load_config(EvalConfig, path).prompts.source == str(cwd / name)
    for kept in ("synthetic", {"source": name, "format": "hub"}):
        prompts = kept if isinstance(kept, dict) else {"source": kept}
        cfg = load_config(EvalConfig, write(config_dir, EvalConfig, {"prompts": prompts}))
        assert cfg.prompts.source == prompts["source"]
    # an OpenAI-compatible model name is a name, never a path
    cfg = load_config(GenerateConfig, write(config_dir, GenerateConfig, {}), check_paths=True)
    assert cfg.teacher.model == "served-name"


def test_a_saved_config_means_the_same_from_any_directory(folders, tmp_path, monkeypatch):
    config_dir, cwd = folders
    for sub in ("presets", "traces"):
        (cwd / sub).mkdir()
    path = write(config_dir, TrainConfig, {"student": {"init": "presets"},
                                           "data": {"traces": ["traces"]}})
    cfg = load_config(TrainConfig, path, check_paths=True)
    saved = save_config(cfg, config_dir / "resolved.yaml")
    monkeypatch.chdir(tmp_path)
    again = load_config(TrainConfig, saved, check_paths=True)
    assert again == cfg and again.output_root == str(cwd / "students")


def _path_validators(annotation) -> bool:
    """Whether a type (or a type inside it) is InputPath / OutputPath."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, AfterValidator) and meta.func in (_input_path, resolve_path, _data_source):
            return True
    return any(_path_validators(a) for a in typing.get_args(annotation))


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def path_fields(schema: type[BaseModel], prefix: str = "") -> set[str]:
    """The dotted keys of every InputPath / OutputPath field of a schema, recursively."""
    out = set()
    for name, field in schema.model_fields.items():
        typed = any(isinstance(m, AfterValidator) and m.func in (_input_path, resolve_path, _data_source)
                    for m in field.metadata)
        if typed or _path_validators(field.annotation):
            out.add(prefix + name)
        for sub in _models_in(field.annotation):
            out |= path_fields(sub, f"{prefix}{name}.")
    return out


def test_every_path_field_is_covered_here():
    """A new path field of a stage's config must be added to FIELDS (prompts.source is a path or
    a hub name, resolved by its own validator with the same rule)."""
    for schema in BASE:
        declared = path_fields(schema) | ({"prompts.source"} if "prompts" in
                                          schema.model_fields else set())
        listed = {key.replace(".0", "") for s, key, _, _ in FIELDS if s is schema}
        assert declared == listed, schema.__name__
