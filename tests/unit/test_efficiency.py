"""The efficiency report: FLOPs from parameters and tokens, MFU only with a known GPU."""

from __future__ import annotations

from pathlib import Path

from polyalign.stages.core import efficiency


def test_flops_throughput_and_size(tmp_path: Path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "adapter.safetensors").write_bytes(b"x" * 1000)
    m = {"wall_seconds": 10.0, "total_params": 1_000_000, "tokens_trained": 2000, "tokens_forward": 500,
         "trainable_params": 8704, "peak_rss_bytes": 2**30}
    monkeypatch.setattr(efficiency, "peak_flops", lambda: (None, None))
    e = efficiency.report(m, tmp_path / "model")
    assert e["flops"] == 6 * 1e6 * 2000 + 2 * 1e6 * 500
    assert e["tokens_per_second"] == 250.0 and e["saved_model_bytes"] == 1000 and e["mfu"] is None
    monkeypatch.setattr(efficiency, "peak_flops", lambda: ("NVIDIA H100 80GB HBM3", 989e12))
    e = efficiency.report(m, tmp_path / "model")
    assert e["mfu"] == round(1.3e10 / 10 / 989e12, 4)
    text = efficiency.table({"sft": e})
    assert "| sft | 10 s | 250 |" in text and "13.0G" in text and "1.0kB" in text


def test_trainer_stages_use_their_counted_tokens(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(efficiency, "peak_flops", lambda: (None, None))
    e = efficiency.report({"wall_seconds": 2.0, "total_params": 10, "tokens": 100}, tmp_path / "none")
    assert e["flops"] == 6000 and e["tokens"] == 100 and e["saved_model_bytes"] == 0 and e["device"] == "cpu"
