"""The GPU benchmark script cannot run here (no GPU), so its whole path is checked on the CPU with tiny
sizes: k processes really train at once after the barrier, and the JSON holds one row per k."""

from __future__ import annotations

import json

import pytest

from bench import gpu

pytestmark = pytest.mark.slow


def test_gpu_bench_runs_on_cpu_with_tiny_sizes(tmp_path) -> None:
    rc = gpu.main(["--device", "cpu", "--size", "16", "--width", "8", "--steps", "2", "--ks", "1,2",
                   "--backbones", "segresnet", "--strategies", "full,bitfit", "--results", str(tmp_path)])
    assert rc == 0
    sharing = json.loads((tmp_path / "gpu_sharing.json").read_text())
    assert [r["k"] for r in sharing["rows"]] == [1, 2]
    assert all("error" not in r and r["volumes_per_s"] > 0 for r in sharing["rows"])
    assert sharing["rows"][0]["throughput_vs_k1"] == 1.0
    table = json.loads((tmp_path / "gpu_strategies.json").read_text())["rows"]
    assert [r["strategy"] for r in table] == ["full", "bitfit"]
    bitfit = table[1]
    assert bitfit["trainable_fraction"] < 0.01 and bitfit["storage_vs_full"] < 0.01
    assert sharing["command"].startswith("python -m bench.gpu") and sharing["machine"]["cuda"] is False
