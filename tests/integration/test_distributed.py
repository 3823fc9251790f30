"""A training stage under a multi-process launcher (accelerate launch, 2 processes, gloo on
CPU): both processes train, only the main one writes, and the store ends with one artifact
whose adapter loads. (`accelerate launch --cpu` starts several processes only through mpirun;
`--multi_gpu` on a machine without GPUs starts them through torch.distributed.run, and the
Trainer joins them with gloo: the code path of `--config_file configs/accelerate/ddp.yaml` on
GPUs.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polyalign.stages.core.pipeline import load_pipeline
from tests.conftest import ROOT, TINY, cli

pytestmark = pytest.mark.integration


def test_sft_under_accelerate_launch_two_processes_commits_one_artifact(tmp_path):
    store = str(tmp_path / "store")
    assert cli("run", str(TINY), "--until", "translate", "--store", store).returncode == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(
        [*launch, "-m", "polyalign", "stage", "sft", str(TINY), "--store", store],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [line for line in proc.stdout.splitlines() if line.startswith("sft: done -> ")]
    assert len(done) == 2 and done[0] == done[1]  # each process reports the one artifact
    sft_dir = Path(store) / "sft"
    assert [p.name for p in sft_dir.iterdir() if not p.name.endswith(".lock")] == [Path(done[0].split(" -> ")[1]).name]
    pipe = load_pipeline(TINY, store=store)
    art = pipe.store.open("sft", pipe.fingerprints()["sft"])
    assert art.metrics["global_step"] == 8 and len(art.read_json("train_log.json")) > 0
    # data parallel: each of the 8 steps took a batch in each process (2 x 4 of the 69 examples)
    assert max(h.get("epoch", 0) for h in art.read_json("train_log.json")) == pytest.approx(8 / 9, abs=1e-3)
    assert not any(rel.startswith(("checkpoints/", "dataset_cache/")) for rel in art.files)
    # the main process alone wrote training curves (TensorBoard) and the efficiency report
    assert len([rel for rel in art.files if rel.startswith("tensorboard/events.out.tfevents")]) == 1
    assert art.metrics["efficiency"]["tokens_per_second"] > 0
    from peft import PeftModel

    from polyalign.stages.core.loading import load_causal_lm
    from polyalign.stages.core.prepare import ensure_model

    base = load_causal_lm(ensure_model(pipe.header.models["base"], pipe.models_root), dtype="float32")
    model = PeftModel.from_pretrained(base, art.file("model"))
    assert json.loads(art.read_bytes("model/adapter_config.json"))["r"] == 4 and model is not None


def test_a_stage_that_cannot_run_on_several_processes_says_so(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "polyalign", "stage", "self_instruct", str(TINY), "--store", str(tmp_path / "s")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "only sft, reward_model, align run under accelerate launch / torchrun" in proc.stderr
