"""The programs in examples/ run and print what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
