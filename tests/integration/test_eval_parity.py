"""Parity of the evaluate stage's multiple-choice scoring with lm-evaluation-harness.

For each case the stage's own path runs (`evaluate.Config` with preset `lm-eval` ->
`settings()` -> `evaluate_benchmark(ChoiceScorer, ...)`) on a tiny random model, and
lm-eval 0.4.13 (`simple_evaluate` with an `HFLM` on the same model folder) runs the task that
`lmeval_export.write_task` writes for the same settings. Every document must get the same
context and continuation strings, per-choice log-likelihoods within 1e-4, the same acc and
acc_norm; the aggregates and their standard errors must match too.

Offline throughout: the HF hub/datasets/transformers offline switches are on and lm-eval's
dataset cache lives in a temporary folder. The Okapi m_arc / m_mmlu cases need the shared
data folder (`../shared/data/okapi_eval`) and are skipped without it; the built-in benchmark
cases always run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration

LL_TOLERANCE = 1e-4
STDERR_TOLERANCE = 1e-9
OKAPI = SHARED_DATA / "okapi_eval"
SOURCES = {
    "mc": "builtin",
    "arc": str(OKAPI / "m_arc" / "{lang}_{split}.json"),
    "mmlu": str(OKAPI / "m_mmlu" / "{lang}_{split}.json"),
}


def _needs(task: str, lang: str, *splits: str) -> pytest.MarkDecorator:
    """Skip a case whose shared Okapi files are absent (no ../shared/data checkout)."""
    files = [Path(SOURCES[task].format(lang=lang, split=split)) for split in splits]
    missing = [str(f) for f in files if not f.is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"shared Okapi data absent: {', '.join(missing)}")


def _case(task: str, lang: str, shots: int, sampling: str = "random", limit: int | None = None, split: str | None = None, bos: bool = False):
    marks = []
    if task != "mc":
        marks.append(_needs(task, lang, split or "test", *([{"arc": "train", "mmlu": "dev"}[task]] if shots else [])))
    ident = f"{task}-{lang}-{shots}shot" + (f"-{sampling}" if shots else "") + ("-bos" if bos else "")
    return pytest.param(task, lang, shots, sampling, limit, split, bos, id=ident, marks=marks)


CASES = [
    # the built-in mini benchmark (all its documents of the language): always available
    _case("mc", "en", 0),
    _case("mc", "en", 3),
    _case("mc", "fr", 0),
    _case("mc", "fr", 3),
    # Okapi m_arc: test documents, shots from train (per-document draws, or lm-eval's first_n)
    *[
        c
        for lang in ("fr", "de")
        for c in (
            _case("arc", lang, 0, limit=20),
            _case("arc", lang, 5, "random", limit=20),
            _case("arc", lang, 5, "first_n", limit=20),
        )
    ],
    # Okapi m_mmlu: lm-eval's letters template, the `val` split
    _case("mmlu", "de", 0, limit=20, split="val"),
    _case("mmlu", "fr", 3, "first_n", limit=12, split="val"),  # lm-eval's m_mmlu sampler
    # a tokenizer that prepends BOS (Llama, Gemma): per-document shots and a shared prefix
    _case("mc", "fr", 3, bos=True),
    _case("arc", "de", 5, "first_n", limit=20, bos=True),
]


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory):
    """No network for the hub, datasets and transformers; lm-eval's dataset cache in a
    scratch folder. Set before lm-eval (and datasets) are imported; when another test
    imported them already, their import-time constants are patched as well."""
    cache = tmp_path_factory.mktemp("hf_datasets")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        import datasets.config
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", Path(cache))
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", Path(cache) / "downloads")
        mp.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", Path(cache) / "downloads" / "extracted")
        yield cache


@pytest.fixture(scope="module")
def lms(offline, tmp_path_factory: pytest.TempPathFactory):
    """`get(bos)` -> (model, tokenizer, HFLM) on one tiny random model, built once.

    bos=False: the tiny model's folder as built (its tokenizer adds no special tokens).
    bos=True: a copy whose saved tokenizer prepends BOS, as Llama's and Gemma's do, so the
    BOS handling of both sides is compared too. Both sides load the folder their usual way
    (the stage's `load_tokenizer`, lm-eval's HFLM); one HFLM per folder for the module.

    One torch thread: the model is so small that more threads only add contention (a busy
    2-core machine makes multi-threaded forwards of this size 50x slower)."""
    import logging
    import shutil

    import torch
    from lm_eval.models.huggingface import HFLM

    from polyalign.stages.core.loading import load_causal_lm, load_tokenizer
    from polyalign.stages.core.model_specs import ModelSpec, TinySpec, models_dir
    from polyalign.stages.core.prepare import ensure_model

    for noisy in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = ensure_model(ModelSpec(tiny=TinySpec(seed=3)), models_dir())
    model = load_causal_lm(path, dtype="float32").to("cpu").eval()
    loaded: dict[bool, tuple] = {}

    def get(bos: bool) -> tuple:
        if bos not in loaded:
            folder = path
            if bos:
                folder = str(tmp_path_factory.mktemp("tiny-bos") / "model")
                shutil.copytree(path, folder)
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(folder, add_bos_token=True).save_pretrained(folder)
            tok = load_tokenizer(folder)
            assert (tok("Answer:")["input_ids"][0] == tok.bos_token_id) == bos
            loaded[bos] = (model, tok, HFLM(pretrained=folder, device="cpu", dtype="float32", batch_size=1))
        return loaded[bos]

    yield get
    torch.set_num_threads(threads)


def _stage_settings(task: str, lang: str, shots: int, sampling: str, limit: int | None, split: str | None):
    """The settings the evaluate stage resolves for this benchmark and language."""
    from polyalign.stages.evaluate import Config, settings

    bench: dict = {"task": task, "source": SOURCES[task]}
    if shots:  # 0-shot cases keep the preset's default (0)
        bench.update(shots=shots, shot_sampling=sampling)
    if split:
        bench["split"] = split
    cfg = Config(model="base", languages=[lang], preset="lm-eval", benchmarks={"bench": bench}, limit=limit)
    s = settings(cfg, "bench", lang)
    assert (s.protocol, s.seed, s.shots, s.limit) == ("lm-eval", 1234, shots, limit)
    if shots:
        assert s.shot_sampling == sampling
    return s


@pytest.mark.parametrize("task, lang, shots, sampling, limit, split, bos", CASES)
def test_matches_lm_eval(task, lang, shots, sampling, limit, split, bos, lms, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from polyalign.stages.core.lmeval_export import samples_by_doc, write_task
    from polyalign.stages.core.scoring import ChoiceScorer
    from polyalign.stages.evaluate import evaluate_benchmark

    model, tok, hflm = lms(bos)
    s = _stage_settings(task, lang, shots, sampling, limit, split)

    # ours: the stage's call, with a scorer that remembers the requests it was given
    class Recording(ChoiceScorer):
        def score(self, contexts, continuations, prefix=None, desc="score"):
            self.requests = (list(contexts), [list(c) for c in continuations], prefix)
            return super().score(contexts, continuations, prefix, desc=desc)

    scorer = Recording(model, tok, batch_size=8, progress=False)
    docs, metrics = evaluate_benchmark(scorer, s, lang)
    contexts, continuations, prefix = scorer.requests

    # lm-eval: the exported task for the same settings
    name = f"parity_{task}_{lang}_{shots}_{sampling}{'_bos' if bos else ''}".replace("-", "_")
    write_task(name, s, lang, tmp_path)
    out = lm_eval.simple_evaluate(
        model=hflm,
        tasks=[name],
        num_fewshot=shots,
        limit=limit,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
    )
    ref = samples_by_doc(out, name)
    raw = sorted(out["samples"][name], key=lambda r: r["doc_id"])
    agg = out["results"][name]
    preds = metrics["predictions"]

    assert len(docs) == len(preds) == len(ref) == metrics["n"]
    assert len(ref) == (limit or len(ref)) and len(ref) >= 12
    if task == "mc" and limit is None:
        assert len(ref) == 24  # every mini benchmark document of the language

    # the requests: same context and continuation strings for every document
    for k, (ctx, conts, r, sample) in enumerate(zip(contexts, continuations, ref, raw)):
        assert ctx == r["context"], f"document {k}: contexts differ"
        assert conts == [a[1] for a in sample["arguments"]], f"document {k}: continuations differ"
        assert all(a[0] == ctx for a in sample["arguments"])
    if shots:
        assert all(c.count("\n\n") >= shots for c in contexts)

    # the scores: per choice, then per document acc / acc_norm
    for k, (p, r) in enumerate(zip(preds, ref)):
        assert len(p["loglikelihoods"]) == len(r["loglikelihoods"])
        for c, (ours, theirs) in enumerate(zip(p["loglikelihoods"], r["loglikelihoods"])):
            assert ours == pytest.approx(theirs, abs=LL_TOLERANCE), f"document {k} choice {c}"
        assert float(p["pred"] == p["gold"]) == r["acc"], f"document {k}: acc differs"
        assert float(p["pred_norm"] == p["gold"]) == r["acc_norm"], f"document {k}: acc_norm differs"

    # the aggregates
    assert metrics["acc"] == agg["acc,none"]
    assert metrics["acc_norm"] == agg["acc_norm,none"]
    for key in ("acc", "acc_norm"):
        ours, theirs = metrics[f"{key}_stderr"], agg[f"{key}_stderr,none"]
        assert math.isfinite(ours) and abs(ours - theirs) <= STDERR_TOLERANCE, (key, ours, theirs)

    # the scorer took the path the settings call for
    assert scorer.stats["per_request"] == 0
    if shots and sampling == "first_n":
        assert prefix is not None and all(c.startswith(prefix) for c in contexts)
        assert scorer.stats["prefixed"] > 0
    else:
        assert prefix is None
        assert scorer.stats["cached"] > 0 and scorer.stats["prefixed"] == 0
