"""The efficiency report of a training stage: time, throughput, FLOPs, MFU, memory, size.

FLOPs are the usual estimates for a dense transformer of N parameters: 6·N per trained token
(forward and backward) and 2·N per token only run forward (generation, reference and
old-policy passes of PPO). MFU is achieved FLOP/s over the GPU's dense bf16 peak, from the
table below by device name (None on CPU or an unknown GPU). Tokens are those the trainer
counted (non-padding) for TRL stages; PPO counts its own. After a resume, the wall time is that
of every run of the stage (a killed run counted up to its last write into the work folder), as
the tokens count the whole training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of the device name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "RTX 4090": 165e12}


def peak_flops() -> tuple[str | None, float | None]:
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def report(metrics: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The efficiency entries for a training stage's metrics (which hold its counts)."""
    wall = float(metrics.get("wall_seconds") or 0.0)
    n = int(metrics.get("total_params") or 0)
    trained = int(metrics.get("tokens_trained", metrics.get("tokens", 0)) or 0)
    forward_only = int(metrics.get("tokens_forward", 0) or 0)
    flops = 6.0 * n * trained + 2.0 * n * forward_only
    device, peak = peak_flops()
    return {
        "wall_seconds": wall,
        "tokens": trained + forward_only,
        "tokens_per_second": round((trained + forward_only) / wall, 1) if wall else None,
        "flops": flops,
        "mfu": round(flops / wall / peak, 4) if wall and peak else None,
        "device": device or "cpu",
        "peak_rss_bytes": metrics.get("peak_rss_bytes"),
        "peak_cuda_bytes": metrics.get("peak_cuda_bytes"),
        "trainable_params": metrics.get("trainable_params"),
        "total_params": n or None,
        "saved_model_bytes": folder_bytes(model_dir),
    }


def num(x: Any, unit: str = "") -> str:
    """A count or size for a table: 1.2G, 3.4MB; n/a for None."""
    if x is None:
        return "n/a"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}{unit}"
    return f"{x:.0f}{unit}" if isinstance(x, (int, float)) else str(x)


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The report of several stages as a markdown table."""
    lines = ["| stage | wall | tokens/s | FLOPs | MFU | peak RSS | peak CUDA | trainable params | saved model |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, e in rows.items():
        mfu = f"n/a ({e['device']})" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"
        lines.append(
            f"| {stage} | {e['wall_seconds']:.0f} s | {num(e['tokens_per_second'])} | {num(e['flops'])} | {mfu} | "
            f"{num(e['peak_rss_bytes'], 'B')} | {num(e['peak_cuda_bytes'], 'B')} | {num(e['trainable_params'])} | "
            f"{num(e['saved_model_bytes'], 'B')} |"
        )
    return "\n".join(lines)
