"""A pipeline config: models, stage configs, the edges between stages, and its plan.

```yaml
name: tiny
store: .polyalign/store          # overridden by --store or $POLYALIGN_STORE
languages: [fr, de]              # default for every stage config with a `languages` field
models:
  teacher: {tiny: {seed: 1}}
stages:
  self_instruct: {teacher: teacher}
  translate: {inputs: {data: self_instruct}, model: teacher}
```
A stage entry's key is its name; its type is the key too unless `stage:` says otherwise, so a
pipeline may hold two stages of one type. `inputs:` maps the stage's input names to upstream
stage names. Everything else is the stage's typed config.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from polyalign.stages import REGISTRY, load_stage
from polyalign.stages.core.checked import Checked
from polyalign.stages.core.config import StageConfig
from polyalign.stages.core.errors import ConfigError, StoreError
from polyalign.stages.core.fingerprint import (
    UnhashableError,
    file_digest,
    stage_fingerprint,
)
from polyalign.stages.core.model_specs import (
    ModelSpec,
    check_available,
    identity,
    models_dir,
)
from polyalign.stages.core.store import STORE_ENV, Store, open_store

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# deeper than any config needs, shallow enough that validation never nears Python's recursion limit
MAX_DEPTH = 32


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last
    silently: a second `sft:` would drop every setting of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}  # key -> where it was first given
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then a key of its own is YAML's way to override
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # an unhashable key: the base constructor says so
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, what: str) -> Any:
    """Parse YAML strictly (duplicate keys refused) into plain data no deeper than MAX_DEPTH;
    ConfigError with one line naming `what` otherwise."""
    try:
        value = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what}:{where} invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except RecursionError:
        raise ConfigError(f"{what}: nested deeper than YAML can be read here (at most {MAX_DEPTH} levels)") from None
    depth, path = _depth(value)
    if depth > MAX_DEPTH:
        raise ConfigError(f"{what}: nested more than {MAX_DEPTH} levels deep at {path or 'the top'}")
    return value


def _depth(value: Any) -> tuple[int, str]:
    """(levels of nesting, the dotted path to the deepest point), without recursion; the walk
    stops one level past MAX_DEPTH."""
    best, where = 0, ""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, level, path = stack.pop()
        if isinstance(item, dict):
            children = [(v, f"{path}.{k}" if path else str(k)) for k, v in item.items()]
        elif isinstance(item, list):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(item)]
        else:
            continue
        if level + 1 > best:
            best, where = level + 1, path
        if level + 1 <= MAX_DEPTH:
            stack.extend((v, level + 1, p) for v, p in children)
    return best, where


class ScheduleSpec(Checked):
    """The default schedule of the pipeline's deployment (`polyalign serve`)."""

    model_config = ConfigDict(extra="forbid")
    cron: str | None = Field(None, description="Cron expression, e.g. '0 3 * * *' (03:00 daily).")
    interval: float | None = Field(None, gt=0, description="Seconds between runs.")
    rrule: str | None = Field(None, description="iCalendar RRULE, e.g. 'FREQ=WEEKLY;BYDAY=MO'.")
    timezone: str | None = Field(None, description="IANA time zone of the schedule, e.g. Europe/Paris (default UTC).")
    active: bool = Field(True, description="false: the schedule is created paused.")

    @model_validator(mode="after")
    def _one_kind(self) -> "ScheduleSpec":
        given = [k for k in ("cron", "interval", "rrule") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of cron, interval, rrule (got {', '.join(given) or 'none'})")
        if self.cron is not None and len(self.cron.split()) not in (5, 6):
            raise ValueError(f"cron: {self.cron!r} is not a cron expression (5 fields: minute hour day month weekday)")
        if self.timezone is not None:
            import zoneinfo

            try:
                zoneinfo.ZoneInfo(self.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"timezone: unknown time zone {self.timezone!r}") from None
        return self


class RetrySpec(Checked):
    """Prefect task retries of a failed flow run's tasks (a user error is never retried)."""

    model_config = ConfigDict(extra="forbid")
    units: int = Field(2, ge=0, description="Fan-out units (translation, evaluation per language): a retry resumes from the unit's saved shards.")
    stages: int = Field(0, ge=0, description="Other non-training stages.")
    training: int = Field(0, ge=0, description="Training stages (sft, reward_model, align): they resume from their last checkpoint.")
    delay_seconds: float = Field(10, ge=0, description="Wait before each retry.")


class TaskRunnerSpec(Checked):
    """Where a flow run's stage and unit tasks execute. thread: threads of the flow's process;
    dask or ray: an existing engine's workers (the extras polyalign[dask] or polyalign[ray]).
    On those, a worker runs each task in its own process, so `concurrency` and the one-training-
    stage-at-a-time rule apply per worker; size the cluster to the devices it has."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["thread", "dask", "ray"] = Field("thread", description="thread, dask or ray.")
    address: str | None = Field(
        None, description="An existing cluster (dask: tcp://host:8786, ray: ray://host:10001 or auto); "
        "none: a local cluster started for the run and stopped after it.")
    workers: int | None = Field(None, gt=0, description="Workers of the local cluster (dask: n_workers; ray: num_cpus).")


class PipelineHeader(Checked):
    """Top-level keys of a pipeline YAML (the `stages:` table is validated per stage)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="Name of the pipeline (shown in Prefect and reports).")
    description: str = Field("", description="Free text.")
    store: str = Field(".polyalign/store", description="Artifact store root: a local folder, or an fsspec URL (s3://, gs://, file://).")
    models_dir: str | None = Field(
        None, description="Where prepared/tiny models live (default $POLYALIGN_MODELS or ~/.cache)."
    )
    languages: list[str] = Field(default_factory=list, description="Default target languages.")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Named models.")
    stages: dict[str, dict[str, Any]] = Field(..., description="Stage name -> stage entry (at least one).")
    schedule: ScheduleSpec | None = Field(None, description="Default schedule of the deployment `polyalign serve` makes.")
    retries: RetrySpec = Field(default_factory=RetrySpec, description="Task retries in a flow run.")
    task_runner: TaskRunnerSpec = Field(default_factory=TaskRunnerSpec, description="Where the tasks of a flow run execute.")

    @field_validator("stages")
    @classmethod
    def _some_stages(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("no stages: name at least one (e.g. self_instruct: {teacher: ...})")
        return v

    @field_validator("task_runner", mode="before")
    @classmethod
    def _runner_by_name(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v  # `task_runner: dask` is short for {kind: dask}


@dataclass
class StageNode:
    name: str
    type: str
    config: StageConfig
    inputs: dict[str, str]  # input name -> upstream stage name
    module: Any = field(repr=False)


@dataclass
class StagePlan:
    name: str
    type: str
    fingerprint: str
    state: str
    size: int
    inputs: dict[str, str]
    problem: str | None = None  # why the artifact is corrupt


def _format_loc(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts).replace(".[", "[")


def _fields_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) config model that `loc` points into."""
    ann: Any = model_cls
    for key in loc:
        if typing.get_origin(ann) is dict:  # e.g. models: dict[str, ModelSpec]; key is a name
            ann = typing.get_args(ann)[1]
            continue
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)) or str(key) not in ann.model_fields:
            return []
        ann = ann.model_fields[str(key)].annotation
        # unwrap `X | None`
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
            ann = args[0]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return list(ann.model_fields)
    return []


def validation_message(prefix: str, exc: ValidationError, model_cls: type[BaseModel] | None = None) -> str:
    """One line naming the first offending field of a pydantic error."""
    err = exc.errors()[0]
    where = _format_loc(prefix, err["loc"])
    if err["type"] == "extra_forbidden":
        bad = str(err["loc"][-1])
        msg = f"{where}: unknown key {bad!r}"
        known = _fields_at(model_cls, err["loc"][:-1]) if model_cls else []
        if known:
            close = difflib.get_close_matches(bad, known, n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        return msg
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    value = err.get("input")
    if err["type"] == "value_error":  # our own validators already name the value
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    shown = f" (got {value!r})" if not isinstance(value, (dict, list)) else ""
    return f"{where}: {err['msg']}{shown}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a mapping")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    """Apply `key.path=value` overrides; a leading stage name means `stages.<name>`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value_text = item.split("=", 1)
        key = key.strip()
        value = read_yaml(value_text, f"--set {key}") if value_text.strip() else ""
        head = key.split(".", 1)[0]
        if head in (raw.get("stages") or {}) and head not in PipelineHeader.model_fields:
            key = "stages." + key
        _set_dotted(raw, key, value)


class Pipeline:
    """A validated pipeline: its stages in order, their configs, models and store."""

    def __init__(
        self, header: PipelineHeader, nodes: dict[str, StageNode], source: str, store_root: str, overrides: list[str] | None = None
    ):
        self.header = header
        self.nodes = nodes
        self.source = source
        self.store: Store = open_store(store_root, config=source, overrides=overrides or [])
        self.models_root = models_dir(header.models_dir)
        self._fps: dict[str, str] | None = None

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def order(self) -> list[str]:
        return list(self.nodes)

    def until(self, stage: str | None) -> list[str]:
        """Stage names up to and including `stage` (all stages when None)."""
        if stage is None:
            return self.order
        if stage not in self.nodes:
            raise ConfigError(f"--until: unknown stage {stage!r} (stages: {', '.join(self.nodes)})")
        return self.order[: self.order.index(stage) + 1]

    def model_identities(self, node: StageNode) -> dict[str, str]:
        return {
            path: identity(self.header.models[name], self.models_root)
            for path, name in node.config.model_refs().items()
        }

    def warnings(self) -> list[str]:
        """One line per setting that is valid but likely a mistake (the stages' own `warnings`)."""
        out = []
        for name, node in self.nodes.items():
            check = getattr(node.config, "warnings", None)
            if callable(check):
                out += [f"stages.{name}.{line}" for line in check()]
        return out

    def fingerprints(self) -> dict[str, str]:
        if self._fps is None:
            fps: dict[str, str] = {}
            for name, node in self.nodes.items():
                try:
                    fps[name] = stage_fingerprint(
                        stage_type=node.type,
                        version=node.module.VERSION,
                        semantic_config=node.config.semantic_dict(),
                        inputs={k: fps[v] for k, v in node.inputs.items()},
                        models=self.model_identities(node),
                        files={k: file_digest(v) for k, v in node.config.data_files().items()},
                    )
                except UnhashableError as exc:
                    raise ConfigError(f"stages.{name}: {exc}") from exc
            self._fps = fps
        return self._fps

    def plan(self, stages: list[str] | None = None, deep: bool = False) -> list[StagePlan]:
        """Each stage's state in the store; `deep` hashes every file of complete artifacts."""
        fps = self.fingerprints()
        out = []
        for name in stages or self.order:
            node = self.nodes[name]
            fp = fps[name]
            state, problem = self.store.diagnose(name, fp, required=node.module.OUTPUTS, deep=deep)
            out.append(
                StagePlan(
                    name=name,
                    type=node.type,
                    fingerprint=fp,
                    state=state,
                    size=self.store.size(name, fp),
                    inputs=dict(node.inputs),
                    problem=problem,
                )
            )
        return out

    def check_servers(self, stages: list[str]) -> None:
        """Every API model the `stages` use answers and serves its model (GenerationError)."""
        used = {m for s in stages for m in self.nodes[s].config.model_refs().values()}
        if any(self.header.models[m].remote for m in used):
            from polyalign.stages.core.backends import check_remote

            check_remote(self.header.models, used)

    def upstream(self, stage: str) -> list[str]:
        """All ancestors of `stage`, in pipeline order."""
        need: set[str] = set()
        todo = list(self.nodes[stage].inputs.values())
        while todo:
            s = todo.pop()
            if s not in need:
                need.add(s)
                todo.extend(self.nodes[s].inputs.values())
        return [s for s in self.order if s in need]


def _topological(stages: dict[str, Any]) -> list[str]:
    """Stage names ordered so that every stage comes after its inputs (YAML order otherwise)."""
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"stages.{name}: expected a mapping of config keys")
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name) :] + [name])
            raise ConfigError(f"stages.{name}.inputs: cycle {cycle}")
        visiting.append(name)
        inputs = stages[name].get("inputs") or {}
        if isinstance(inputs, dict):
            for upstream in inputs.values():
                if isinstance(upstream, str) and upstream in stages:
                    visit(upstream)
        visiting.pop()
        order.append(name)

    for name in stages:
        visit(name)
    return order


# the stage types whose artifact each input takes: an edge to another type is a config error
PRODUCERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("translate", "data"): ("self_instruct",),
    ("sft", "data"): ("translate", "self_instruct"),
    ("preferences", "data"): ("translate", "self_instruct"),
    ("preferences", "policy"): ("sft",),
    ("reward_model", "pairs"): ("preferences",),
    ("reward_model", "policy"): ("sft",),
    ("align", "pairs"): ("preferences",),
    ("align", "policy"): ("sft",),
    ("align", "reward_model"): ("reward_model",),
    ("align", "prompts"): ("translate", "self_instruct"),
    ("evaluate", "sft"): ("sft",),
    ("evaluate", "aligned"): ("align",),
    ("evaluate", "reward_model"): ("reward_model",),
}


def _check_languages_produced(where: str, cfg: Any, data: "StageNode") -> None:
    """A stage that picks languages out of its data input asks only for languages that input
    has (else it would train or sample on fewer languages than asked, without a word)."""
    if data.type == "translate":
        produced = set(getattr(data.config, "languages", ())) | ({"en"} if getattr(data.config, "keep_source", True) else set())
    else:  # self_instruct writes English
        produced = {"en"}
    missing = [lang for lang in cfg.languages if lang not in produced]
    if missing:
        raise ConfigError(
            f"{where}.languages: {', '.join(missing)} not in the records of {data.name!r} "
            f"(it has {', '.join(sorted(produced))}); add them to {data.name}.languages or drop them here"
        )


def load_pipeline(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    store: str | None = None,
    check_models: bool = True,
) -> Pipeline:
    """Read, override and validate a pipeline YAML. Raises ConfigError with one-line messages."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save the config as UTF-8") from None
    raw = read_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(raw, overrides or [])
    try:
        header = PipelineHeader.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_message("", exc, PipelineHeader)) from exc

    nodes: dict[str, StageNode] = {}
    for name in _topological(header.stages):
        entry = header.stages[name]
        where = f"stages.{name}"
        entry = dict(entry)
        if not _NAME.match(name):
            raise ConfigError(f"{where}: stage names are lowercase letters, digits and '_' (got {name!r})")
        stage_type = entry.pop("stage", name)
        if not isinstance(stage_type, str) or stage_type not in REGISTRY:
            close = difflib.get_close_matches(str(stage_type), list(REGISTRY), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(REGISTRY)})"
            raise ConfigError(f"{where}: unknown stage type {stage_type!r}{hint}")
        module = load_stage(stage_type)
        inputs = entry.pop("inputs", None) or {}
        if not isinstance(inputs, dict):
            raise ConfigError(f"{where}.inputs: expected a mapping of input name -> stage name")
        declared = dict(module.INPUTS) | dict(getattr(module, "OPTIONAL_INPUTS", {}))
        for input_name, upstream in inputs.items():
            if not isinstance(upstream, str):
                raise ConfigError(f"{where}.inputs.{input_name}: expected a stage name (got {upstream!r})")
            if input_name not in declared:
                raise ConfigError(
                    f"{where}.inputs.{input_name}: {stage_type} has no input {input_name!r} "
                    f"(inputs: {', '.join(declared)})"
                )
            if upstream not in nodes:
                raise ConfigError(f"{where}.inputs.{input_name}: {upstream!r} is not a stage")
            allowed = PRODUCERS.get((stage_type, input_name))
            if allowed and nodes[upstream].type not in allowed:
                raise ConfigError(
                    f"{where}.inputs.{input_name}: {upstream!r} is a {nodes[upstream].type} stage; "
                    f"{stage_type}'s {input_name} takes the artifact of {' or '.join(allowed)}"
                )
        for required in module.INPUTS:
            if required not in inputs:
                raise ConfigError(f"{where}.inputs: missing required input {required!r}")
        if "languages" in module.Config.model_fields and "languages" not in entry and header.languages:
            entry["languages"] = list(header.languages)
        try:
            cfg = module.Config.model_validate(entry)
        except ValidationError as exc:
            raise ConfigError(validation_message(where, exc, module.Config)) from exc
        local_refs = cfg.local_model_refs()
        for field_path, model_name in cfg.model_refs().items():
            if model_name not in header.models:
                defined = ", ".join(header.models) or "none"
                raise ConfigError(f"{where}.{field_path}: unknown model {model_name!r} (defined: {defined})")
            if field_path in local_refs and header.models[model_name].remote:
                raise ConfigError(
                    f"{where}.{field_path}: models.{model_name} is served over HTTP (openai), but this "
                    "field needs local weights (training, adapters or log-likelihoods); name a local model"
                )
        if stage_type in ("sft", "preferences") and getattr(cfg, "languages", None):
            _check_languages_produced(where, cfg, nodes[inputs["data"]])
        check_config = getattr(module, "check_config", None)
        if check_config is not None:  # settings that depend on models or inputs
            problem = check_config(cfg, header.models, set(inputs))
            if problem:
                raise ConfigError(f"{where}.{problem}")
        check_inputs = getattr(module, "check_inputs", None)
        if check_inputs is not None:
            problem = check_inputs(set(inputs))
            if problem:
                raise ConfigError(f"{where}.inputs: {problem}")
        nodes[name] = StageNode(name=name, type=stage_type, config=cfg, inputs=inputs, module=module)

    root = models_dir(header.models_dir)
    if check_models:
        used = {m for node in nodes.values() for m in node.config.model_refs().values()}
        for model_name in used:
            check_available(model_name, header.models[model_name], root)
    if store is not None and not store.strip():
        raise StoreError("--store: empty path (name a folder, or leave the option out)")
    store_root = store or os.environ.get(STORE_ENV) or header.store
    if not store_root.strip():
        raise StoreError(f"{path}: store: empty path (name a folder)")
    return Pipeline(header, nodes, str(path), store_root, list(overrides or []))
