"""Secure defaults: a model's own Python code runs, and pickled weights load, only when its
entry opts in (`trust_remote_code: true`, `allow_pickle: true`); secrets are masked in what
polyalign prints and logs; the servers polyalign starts listen on 127.0.0.1. Each test fails
when its default is switched off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from tests.reliability.test_bad_input import run_cli

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny model (safetensors), built once."""
    from polyalign.stages.core.model_specs import ModelSpec, TinySpec
    from polyalign.stages.core.prepare import ensure_model

    root = tmp_path_factory.mktemp("secure-models")
    return Path(ensure_model(ModelSpec(tiny=TinySpec(seed=9)), root))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pickled_weights_load_only_when_the_entry_allows_pickle(tiny_folder, tmp_path, models_dir):
    import torch
    from safetensors.torch import load_file

    folder = _copy(tiny_folder, tmp_path / "pickled")
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")  # what an old checkpoint looks like

    code, _, err = run_cli(["validate", str(TINY), "--set", f"models.base={{path: {folder}}}"])
    assert code == 2 and "models.base" in err and "allow_pickle: true" in err and "Traceback" not in err, err
    code, out, err = run_cli(["validate", str(TINY), "--set", f"models.base={{path: {folder}, allow_pickle: true}}"])
    assert code == 0, err

    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.loading import load_causal_lm
    from polyalign.stages.core.model_specs import ModelSpec
    from polyalign.stages.core.prepare import ensure_model

    # the loaders ask the entry too: a path resolved without allow_pickle does not unpickle
    path = ensure_model(ModelSpec(path=str(folder)), models_dir)
    with pytest.raises(UserError, match="allow_pickle"):
        load_causal_lm(path, dtype="float32")
    path = ensure_model(ModelSpec(path=str(folder), allow_pickle=True), models_dir)
    model = load_causal_lm(path, dtype="float32")
    key = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[key], weights[key])


def test_a_models_own_code_runs_only_when_the_entry_trusts_it(tiny_folder, tmp_path, models_dir, monkeypatch):
    folder = _copy(tiny_folder, tmp_path / "custom")
    marker = tmp_path / "the-model-code-ran"
    (folder / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))

    code, _, err = run_cli(["validate", str(TINY), "--set", f"models.base={{path: {folder}}}"])
    assert code == 2 and "models.base" in err and "trust_remote_code: true" in err, err

    from polyalign.stages.core.errors import UserError
    from polyalign.stages.core.loading import load_causal_lm
    from polyalign.stages.core.model_specs import ModelSpec
    from polyalign.stages.core.prepare import ensure_model

    with pytest.raises(UserError, match="trust_remote_code"):
        load_causal_lm(ensure_model(ModelSpec(path=str(folder)), models_dir), dtype="float32")
    assert not marker.exists()  # refused before any of its code was imported
    code, _, err = run_cli(["validate", str(TINY), "--set", f"models.base={{path: {folder}, trust_remote_code: true}}"])
    assert code == 0, err
    model = load_causal_lm(ensure_model(ModelSpec(path=str(folder), trust_remote_code=True), models_dir), dtype="float32")
    assert type(model).__name__ == "CustomForCausalLM" and marker.read_text() == "ran"


def test_secrets_are_masked_in_errors(monkeypatch):
    from polyalign.stages.core.errors import redact

    monkeypatch.setenv("MY_SERVICE_API_KEY", "abcd1234efgh5678")
    monkeypatch.setenv("HOME_DIR_NAME", "abcd1234efgh5678-not-a-secret-name")
    text = "call failed: key abcd1234efgh5678, header Authorization: Bearer tok_0123456789abcdef, sk-ABCDEFGHIJKLMNOPQRSTUV"
    masked = redact(text)
    assert "abcd1234efgh5678" not in masked and "<MY_SERVICE_API_KEY>" in masked
    assert "tok_0123456789abcdef" not in masked and "sk-ABCDEFGHIJ" not in masked
    assert masked.startswith("call failed: key ")


def test_a_user_error_holding_a_key_is_printed_masked(monkeypatch, tmp_path):
    """The CLI masks the key even when a user error quotes it (here: the key pasted as a path)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-0123456789abcdefghij")
    code, _, err = run_cli(["validate", str(tmp_path / "sk-live-0123456789abcdefghij.yaml")])
    assert code == 2 and "sk-live-0123456789" not in err and "<OPENAI_API_KEY>" in err, err


def test_the_servers_polyalign_starts_listen_on_localhost():
    """`make server` starts Prefect's server on 127.0.0.1, and `polyalign serve` keeps the
    Prefect runner's own web server (health checks) on 127.0.0.1 when it is switched on."""
    make = (ROOT / "Makefile").read_text()
    server = make.split("\nserver:", 1)[1].split("\n\n", 1)[0]
    assert "prefect server start --host 127.0.0.1" in server, server
    from polyalign.flows.deploy import runner_environment

    env = runner_environment({})
    assert env["PREFECT_RUNNER_SERVER_HOST"] == "127.0.0.1"
    assert runner_environment({"PREFECT_RUNNER_SERVER_HOST": "0.0.0.0"})["PREFECT_RUNNER_SERVER_HOST"] == "0.0.0.0"


def test_the_card_and_manifest_say_which_permission_an_entry_granted(tiny_folder, tmp_path):
    """An entry's opt-in is written beside the model in what the stage publishes; an entry
    without one adds nothing."""
    from polyalign.stages.core.pipeline import load_pipeline

    for flag in ("", "allow_pickle: true"):
        sets = ["--set", f"models.teacher={{path: {tiny_folder}{', ' + flag if flag else ''}}}", "--set", "self_instruct.num_instructions=4"]
        store = tmp_path / (flag.split(":")[0] or "default")
        code, _, err = run_cli(["stage", "self_instruct", str(TINY), "--store", str(store), *sets])
        assert code == 0, err[-2000:]
        pipe = load_pipeline(TINY, sets[1::2], store=str(store))
        art = pipe.store.open("self_instruct", pipe.fingerprints()["self_instruct"])
        card, teacher = art.read_bytes("README.md").decode(), art.manifest["models"]["teacher"]
        if flag:
            assert teacher.endswith(f"({flag})") and f"({flag})" in card, (teacher, card)
        else:
            assert "allow_pickle" not in teacher + card and "trust_remote_code" not in teacher + card
