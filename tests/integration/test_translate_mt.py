"""translate with backend mt from the command line: a tiny NLLB-layout model (random weights,
built here) translates the tiny pipeline's records and the card reports fertility; API models
and stray languages are refused at config time with one line."""

from __future__ import annotations

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import ROOT, TINY, cli
from tests.tiny_seq2seq import build_nllb

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nllb(tmp_path_factory):
    return build_nllb(tmp_path_factory.mktemp("nllb") / "model")


def _sets(nllb, *more: str) -> list[str]:
    items = [f"models.mt.path={nllb}", "translate.backend=mt", "translate.model=mt", "translate.max_new_tokens=12", *more]
    return [x for item in items for x in ("--set", item)]


def test_mt_backend_translates_every_language_and_reports_fertility(nllb, tmp_path):
    store = str(tmp_path / "store")
    sets = _sets(nllb)
    proc = cli("run", str(TINY), "--until", "translate", "--store", store, *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline(TINY, sets[1::2], store=store)
    art = pipe.store.open("translate", pipe.fingerprints()["translate"])
    n = len(art.records("data/en/*.jsonl"))
    m = art.metrics
    for lang in ("fr", "de"):
        rows = art.records(f"data/{lang}/*.jsonl") + art.records(f"quarantine/{lang}/*.jsonl")
        assert len(rows) == n and {r["lang"] for r in rows} == {lang}
        assert m["translated"][lang] + m["quarantined"][lang] == n
        assert m["fertility"][lang] > 0
    # English fertility, counted here from the source records with the base model's tokenizer
    from transformers import AutoTokenizer

    from polyalign.stages.core.prepare import ensure_model

    tok = AutoTokenizer.from_pretrained(ensure_model(pipe.header.models["base"], pipe.models_root))
    texts = [r[f] for r in art.records("data/en/*.jsonl") for f in ("instruction", "input", "output") if r[f].strip()]
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert m["fertility"]["en"] == round(tokens / sum(len(t.split()) for t in texts), 3)
    card = art.read_bytes("README.md").decode()
    assert "machine translation by a sequence-to-sequence model (greedy)" in card
    assert "fertility" in card and "shot" not in card
    # the model identity is in the fingerprint: another seq2seq model is another artifact
    other = load_pipeline(TINY, [*sets[1::2], "translate.num_beams=2"], store=store).fingerprints()["translate"]
    assert other != pipe.fingerprints()["translate"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("translate.mt_models={vi: mt}", "stages.translate: mt_models: vi is not among the languages"),
        ("translate.backend=llm", "mt_models is for backend: mt"),
    ],
)
def test_bad_mt_settings_are_one_line_errors(nllb, tmp_path, override, expected):
    sets = _sets(nllb, "translate.mt_models={fr: mt}") + ["--set", override]
    proc = cli("validate", str(TINY), *sets, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert expected in line and "\n" not in line and "Traceback" not in line


def test_api_model_cannot_run_backend_mt(tmp_path):
    api = ROOT / "configs" / "tiny-api.yaml"
    proc = cli("validate", str(api), "--set", "translate.backend=mt", timeout=120,
               env={**__import__("os").environ, "POLYALIGN_TEST_KEY": "x"})
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "stages.translate.model: models.teacher is served over HTTP, but backend mt" in line and "\n" not in line
