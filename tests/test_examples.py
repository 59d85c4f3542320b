"""The programs in examples/ run and print what their docstrings promise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plan_your_model_plans_two_stacks_on_meta():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "plan_your_model.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "encoder: layers [2, 3, 6, 7, 10, 11] offloaded" in result.stdout
    assert "decoder: layers [2, 3, 6, 7, 10, 11] offloaded" in result.stdout
    assert "layer stack 'encoder'" in result.stdout


def run_app(name: str, tmp_path: Path, *overrides: str) -> tuple[str, dict[str, Any]]:
    """Run ``examples/<name>/run.py`` from ``tmp_path`` (not the repository root) with its
    Hydra output directory there; returns its stdout and the ``results.json`` it wrote."""
    out = tmp_path / "out"
    # One intra-op thread: these tiny models gain nothing from more, and OpenMP workers
    # spinning on a busy 2-core machine make each small matmul many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name / "run.py"), f"hydra.run.dir={out}", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"results: {out / 'results.json'}" in result.stdout
    return result.stdout, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_adapter_finetune_trains_adapters_while_the_frozen_base_is_offloaded(tmp_path):
    stdout, results = run_app("adapter_finetune", tmp_path, "trainer.max_steps=10")
    found = re.search(r"loss: start (\d+\.\d+) -> end (\d+\.\d+)", stdout)
    assert found, stdout
    start, end = float(found[1]), float(found[2])
    assert end < start - 0.1, stdout
    assert "steps: 10" in stdout
    assert "trainable parameters offloaded: 0" in stdout
    # Only frozen base weights of the offloaded layers (1 and 3 of 4) are in host memory.
    offloaded = results["offloaded_params"]
    assert offloaded, stdout
    assert results["trainable_offloaded"] == []
    assert not any("lora_" in name for name in offloaded)
    assert {name.split(".")[3] for name in offloaded} == {"1", "3"}
    assert any(name.endswith("q_proj.base_layer.weight") for name in offloaded)
    stats = results["stats"]
    assert stats["backend"] == "prefetch"
    assert stats["offloaded_bytes"] > 0
    assert stats["forwards"] == 10
    assert stats["stalls"] == 0
    # The slot holds layer 1 when a forward starts: the forward copies layer 3 in, which
    # backward uses where it is, then copies layer 1 back in. Two layer loads per step.
    assert stats["h2d_bytes_per_forward"] == stats["offloaded_bytes"]


@pytest.mark.slow
def test_batch_inference_prefetches_every_batch_without_stalls(tmp_path):
    stdout, results = run_app("batch_inference", tmp_path, "data.batches=3")
    assert "batches: 3 of 4 prompts x 32 tokens" in stdout
    assert re.search(r"time per batch: \d+\.\d ms median", stdout), stdout
    assert "  stalls: 0" in stdout
    assert results["batches"] == 3
    assert results["predictions"] == 3 * 4
    assert len(results["time_per_batch_ms"]) == 3
    stats = results["stats"]
    assert stats["backend"] == "prefetch"
    assert stats["forwards"] == 3
    assert stats["stalls"] == 0
    # Every offloaded layer is copied in exactly once per forward.
    assert stats["offloaded_bytes"] > 0
    assert stats["h2d_bytes_per_forward"] == stats["offloaded_bytes"]
    assert f"  h2d_bytes_per_forward: {float(stats['offloaded_bytes'])}" in stdout


@pytest.mark.slow
def test_moe_experts_uva_offloads_the_experts_and_nothing_else(tmp_path):
    stdout, results = run_app("moe_experts_uva", tmp_path, "data.batches=2")
    assert "every offloaded name contains '.experts.': True" in stdout
    assert "every expert parameter offloaded: True" in stdout
    assert "batches: 2" in stdout
    offloaded = results["offloaded_params"]
    found = re.search(r"offloaded: (\d+) parameters", stdout)
    assert found, stdout
    assert int(found[1]) == len(offloaded) > 0
    assert all(".experts." in name for name in offloaded)
    assert set(offloaded) == set(results["expert_params"])
    stats = results["stats"]
    assert stats["backend"] == "uva"
    assert stats["forwards"] == 2
    assert stats["stalls"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao-int8"])
def test_qlora_finetune_trains_adapters_on_an_offloaded_quantized_base(tmp_path, scheme):
    pytest.importorskip("peft", reason="the [quant] extra (peft) is not installed")
    if scheme == "torchao-int8":
        pytest.importorskip("torchao", reason="the [quant] extra (torchao) is not installed")
    else:
        pytest.importorskip("bitsandbytes", reason="the [quant] extra is not installed")
    stdout, results = run_app(
        "qlora_finetune", tmp_path, f"quantization.scheme={scheme}", "trainer.max_steps=10"
    )
    assert f"quantization: {scheme} (" in stdout
    assert results["scheme"] == scheme
    found = re.search(r"loss: start (\d+\.\d+) -> end (\d+\.\d+)", stdout)
    assert found, stdout
    start, end = float(found[1]), float(found[2])
    assert end < start - 0.1, stdout
    assert "steps: 10" in stdout
    assert "trainable parameters offloaded: 0" in stdout
    # Only frozen quantized base weights (and norms) of layers 1 and 3 of 4 are in host
    # memory; PEFT's adapters are never offloaded.
    offloaded = results["offloaded_params"]
    assert offloaded, stdout
    assert results["trainable_offloaded"] == []
    assert not any("lora_" in name for name in offloaded)
    layers = {re.search(r"\.layers\.(\d+)\.", name)[1] for name in offloaded}
    assert layers == {"1", "3"}
    assert any(name.endswith("q_proj.base_layer.weight") for name in offloaded)
    stats = results["stats"]
    assert stats["backend"] == "prefetch"
    assert stats["forwards"] == 10
    assert stats["stalls"] == 0
    # Quantized weights are what sits in host memory: int8 takes about a quarter of float32
    # (plus scales), nf4 about an eighth (plus its quantization state).
    assert 0 < stats["offloaded_bytes"] < 0.4 * results["offloaded_float32_bytes"]
    assert f"{stats['offloaded_bytes']:,} bytes of {scheme} weights" in stdout
