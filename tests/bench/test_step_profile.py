"""bench/step_profile.py runs on the default model and reports a step time and the op table."""
from __future__ import annotations

import re

from bench import step_profile


def test_step_profile_reports_a_median_and_the_ops(default_model, capsys):
    step_profile.main(["--batch", "2", "--steps", "3", "--rows", "5", "--temperature", "1"])
    out = capsys.readouterr().out
    match = re.search(r"batch 2, none, temperature 1.0: decode step median ([0-9.]+) ms over 3", out)
    assert match and float(match.group(1)) > 0
    assert "aten::" in out and "Self CPU" in out
