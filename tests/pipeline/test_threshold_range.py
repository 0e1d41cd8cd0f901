"""--threshold must be a number inside its column's range: NaN, infinities and out-of-range values are refused
with one line naming the field (issue 16: NaN dropped every sample and then crashed the manifest)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from bicro_clean.cli import app
from bicro_clean.pipeline.config import SelectConfig


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.1, 1.5])
def test_probability_columns_take_zero_to_one(value: float) -> None:
    with pytest.raises(ValidationError, match="threshold"):
        SelectConfig(column="soft_label", threshold=value)


def test_cosine_columns_take_minus_one_to_one() -> None:
    assert SelectConfig(column="match_score", threshold=-0.2).threshold == -0.2
    with pytest.raises(ValidationError, match=r"outside \[-1, 1\]"):
        SelectConfig(column="encoder_cosine", threshold=-1.5)
    with pytest.raises(ValidationError, match=r"outside \[0, 1\]"):
        SelectConfig(column="p_clean", threshold=-0.2)


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_cli_refuses_with_one_line_and_exit_2(tmp_path, value: str) -> None:
    result = CliRunner().invoke(app, ["run", "--input", str(tmp_path / "x.tar"), "--out", str(tmp_path / "o"),
                                      "--threshold", value])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "threshold" in lines[0] and "Traceback" not in result.output
