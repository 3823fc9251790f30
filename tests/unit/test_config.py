"""Config validation: shipped configs load, bad configs give one-line errors with exit code 2."""

import json
from pathlib import Path

import pytest
import yaml

from polyalign.stages import REGISTRY, load_stage
from polyalign.stages.core.errors import ConfigError
from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import ROOT, TINY, cli

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "demo.yaml", "okapi-7b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    # model availability is checked separately: okapi-7b names Hub models
    pipe = load_pipeline(path, check_models=False)
    assert pipe.order, path
    assert len(set(pipe.fingerprints().values())) == len(pipe.order)


def test_okapi_config_has_the_papers_languages():
    pipe = load_pipeline(ROOT / "configs" / "okapi-7b.yaml", check_models=False)
    langs = pipe.nodes["translate"].config.languages
    assert len(langs) == 26
    assert pipe.nodes["self_instruct"].config.num_instructions == 158_000


def test_registry_matches_configs_and_modules():
    used = set()
    for path in CONFIGS:
        raw = yaml.safe_load(path.read_text())
        used |= {entry.get("stage", name) for name, entry in raw["stages"].items()}
    assert used == set(REGISTRY)
    for stage_type in REGISTRY:
        module = load_stage(stage_type)
        for attr in ("VERSION", "Config", "INPUTS", "OUTPUTS"):
            assert hasattr(module, attr), f"{stage_type} lacks {attr}"
        # either one `run`, or the fan-out trio (the loop over units lives in contract.py)
        fan_out = ("units", "run_unit", "finish")
        if hasattr(module, "units"):
            assert all(hasattr(module, a) for a in fan_out) and not hasattr(module, "run"), stage_type
        else:
            assert hasattr(module, "run") and not any(hasattr(module, a) for a in fan_out), stage_type


def _all_fields(model_cls, prefix=""):
    from pydantic import BaseModel

    for name, info in model_cls.model_fields.items():
        yield f"{prefix}{name}", info
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _all_fields(ann, f"{prefix}{name}.")


@pytest.mark.parametrize("stage_type", sorted(REGISTRY))
def test_every_config_field_is_documented(stage_type):
    cfg = load_stage(stage_type).Config
    undocumented = [n for n, info in _all_fields(cfg) if not (info.description or "").strip()]
    assert not undocumented, f"{stage_type}: fields without description: {undocumented}"


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BAD = {
    "unknown key": (lambda r: r["stages"]["sft"]["lora"].update(alhpa=8), "stages.sft.lora.alhpa: unknown key 'alhpa' (did you mean 'alpha'?)"),
    "unknown nested model key": (lambda r: r["models"]["base"]["tiny"].update(hiden_size=8), "models.base.tiny.hiden_size: unknown key 'hiden_size' (did you mean 'hidden_size'?)"),
    "wrong type": (lambda r: r["stages"]["sft"]["train"].update(max_steps="many"), "stages.sft.train.max_steps"),
    "missing model path": (lambda r: r["models"].update(base={"path": "/nowhere/model"}), "models.base.path: model folder '/nowhere/model' does not exist"),
    "unknown stage": (lambda r: r["stages"].update(sftt={"model": "base"}), "stages.sftt: unknown stage type 'sftt' (did you mean 'sft'?)"),
    "unknown model": (lambda r: r["stages"]["sft"].update(model="basis"), "stages.sft.model: unknown model 'basis'"),
    "bad input edge": (lambda r: r["stages"]["sft"].update(inputs={"data": "nothing"}), "stages.sft.inputs.data: 'nothing' is not a stage"),
    "cycle": (lambda r: r["stages"]["self_instruct"].update(inputs={"data": "translate"}), "cycle"),
    "missing seed file": (lambda r: r["stages"]["self_instruct"].update(seed_tasks="/no/seeds.jsonl"), "stages.self_instruct.seed_tasks: seed tasks file '/no/seeds.jsonl' does not exist"),
    "aligned without sft": (lambda r: r["stages"]["evaluate"].update(inputs={"aligned": "align"}), "stages.evaluate.inputs: input 'aligned' needs input 'sft' too"),
    "list as stage type": (lambda r: r["stages"]["sft"].update(stage=["sft"]), "stages.sft: unknown stage type ['sft']"),
    "list as input": (lambda r: r["stages"]["sft"].update(inputs={"data": ["translate"]}), "stages.sft.inputs.data: expected a stage name"),
    "bad stage name": (lambda r: r["stages"].update({"My Stage": {"stage": "sft"}}), "stages.My Stage: stage names are lowercase"),
    "unknown language": (lambda r: r.update(languages=["fr", "xx"]), "unknown language code(s) xx"),
    "top-level typo": (lambda r: r.update(langauges=["fr"]), "langauges: unknown key 'langauges' (did you mean 'languages'?)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_raises_config_error_naming_the_field(tmp_path, case):
    mutate, expected = BAD[case]
    with pytest.raises(ConfigError) as err:
        load_pipeline(write(tmp_path, mutate))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing model path", "unknown stage"])
def test_cli_bad_config_is_one_line_exit_2(tmp_path, case):
    mutate, expected = BAD[case]
    proc = cli("validate", str(write(tmp_path, mutate)))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_override_and_unknown_stage_name():
    proc = cli("validate", str(TINY), "--set", "sft.lora.r=abc")
    assert proc.returncode == 2 and "stages.sft.lora.r" in proc.stderr
    proc = cli("stage", "sftt", str(TINY))
    assert proc.returncode == 2 and "unknown stage 'sftt'" in proc.stderr
    proc = cli("validate", "configs/missing.yaml")
    assert proc.returncode == 2 and "configs/missing.yaml: config file not found" in proc.stderr


def test_malformed_data_files_are_config_errors(tmp_path):
    bad = tmp_path / "bench.jsonl"
    bad.write_text('{"id": "a", "lang": "fr", "question": "?", "choices": ["x"], "answer": 0}\n')
    proc = cli("validate", str(TINY), "--set", f"evaluate.benchmarks.mini_mc.source={bad}")
    assert proc.returncode == 2
    assert f"stages.evaluate: benchmarks.mini_mc: {bad}: row 1: field 'choices' needs at least two" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    okapi = tmp_path / "fr_test.json"
    row = {"id": "x", "instruction": "?", "option_a": "a", "option_b": "b", "option_c": "c", "option_d": "d", "answer": "A"}
    okapi.write_text(json.dumps([row, row, {k: v for k, v in row.items() if k != "option_b"}]))
    source = str(tmp_path / "{lang}_{split}.json")
    over = ["--set", "evaluate.benchmarks.m_arc.task=arc", "--set", f"evaluate.benchmarks.m_arc.source={source}", "--set", "evaluate.benchmarks.m_arc.shots=0"]
    proc = cli("validate", str(TINY), *over)
    assert proc.returncode == 2
    assert proc.stderr == f"error: stages.evaluate: benchmarks.m_arc: {okapi}: row 3: missing field 'option_b'\n"
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "x", "instances": []}\nnot json\n')
    proc = cli("validate", str(TINY), "--set", f"self_instruct.seed_tasks={seeds}")
    assert proc.returncode == 2 and f"{seeds}:2: invalid JSON" in proc.stderr


def test_overrides_apply_to_stage_and_top_level():
    pipe = load_pipeline(TINY, ["sft.lora.r=8", "languages=[fr, vi]", "stages.align.beta=0.2"])
    assert pipe.nodes["sft"].config.lora.r == 8
    assert pipe.nodes["translate"].config.languages == ["fr", "vi"]
    assert pipe.nodes["align"].config.beta == 0.2


def test_help_is_fast_and_light():
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from polyalign.cli import app; "
         "sys.argv=['polyalign','--help']\ntry: app()\nexcept SystemExit: pass\n"
         "assert 'torch' not in sys.modules and 'prefect' not in sys.modules, 'heavy import'"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 5  # generous on a loaded CI box; ~0.3 s here


def test_status_and_validate_load_neither_torch_nor_prefect(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from polyalign.cli import app\n"
        f"sys.argv = ['polyalign', 'status', {str(TINY)!r}, '--json', '--store', {str(tmp_path)!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'prefect', 'transformers', 'trl') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert '"state": "missing"' in proc.stdout


def test_models_prepare_builds_the_tiny_models(models_dir):
    proc = cli("models", "prepare", str(TINY), check=True)
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["teacher", "base"]
    for line in lines:
        folder = Path(line.split(": ", 1)[1])
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        assert folder.parent == models_dir
