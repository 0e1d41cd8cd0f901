"""Every config field's bad value is one line on stderr and exit code 2 before any work, under both runners.

`BAD` holds, for EVERY field of CleanConfig (test_every_field_has_a_bad_value keeps it complete when a field is
added), a bad value and the words its error carries: test_a_bad_value_is_rejected_by_the_config proves the config
refuses it, test_run_refuses_each_bad_value_before_any_work proves `bicro-clean run` stops with exit 2 and that one
line, with the run and the embed stage patched to fail the test if they start. docs/config.md is the users' copy
of this table. `LATE` holds the values that passed the config before and failed minutes later (encoder specs,
fit_sample 1, infinite floats, seeds, thread counts, an empty --out, encoder_cosine from towers); the three
measured cases also run as the real console script, timed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from conftest import config_fields
from test_input_errors import guarded  # noqa: F401  (fixture: a model load or a run start fails the test)
from typer.testing import CliRunner

from bicro_clean import cli
from bicro_clean.pipeline.config import CleanConfig, dump_yaml, load_yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("bicro-clean")
INF = float("inf")

# field -> (a bad value, words of the one-line error)
BAD: dict[str, tuple[Any, str]] = {
    "input": ("nope/*.tar", "input error: no shard matches"),
    "output": ("", "output: empty output folder"),
    "reader.max_image_pixels": (0, "greater than 0"),
    "reader.max_caption_bytes": (0, "greater than 0"),
    "reader.max_aspect_ratio": (0.5, "greater than or equal to 1"),
    "reader.max_decode_seconds": (-1, "greater than or equal to 0"),
    "reader.max_member_bytes": (0, "greater than 0"),
    "reader.allow_pipe": ("maybe", "valid boolean"),
    "embed.encoder": ("tower", "unknown encoder 'tower' (did you mean 'towers'?)"),
    "embed.device": ("gpu", "'gpu' is not auto, cpu, cuda, cuda:N or mps"),
    "embed.batch_size": (0, "greater than 0"),
    "embed.num_workers": (-1, "greater than or equal to 0"),
    "embed.autocast": ("maybe", "valid boolean"),
    "embed.threads": (100_000, "less than or equal to 1024"),
    "embed.progress": ("maybe", "valid boolean"),
    "embed.dtype": ("float64", "'float16' or 'float32'"),
    "embed.jpeg_decode": ("gpu", "'auto', 'cpu' or 'device'"),
    "bicro.seed": (-1, "-1 is outside [0, 4294967295]"),
    "bicro.embed_dim": (0, "greater than 0"),
    "bicro.hidden_dim": (-1, "greater than or equal to 0"),
    "bicro.epochs": (0, "greater than 0"),
    "bicro.warmup_epochs": (-1, "greater than or equal to 0"),
    "bicro.batch_size": (1, "greater than 1"),
    "bicro.lr": (INF, "finite number"),
    "bicro.alpha": (0, "greater than 0"),
    "bicro.soft_margin_base": (1, "greater than 1"),
    "bicro.warmup_keep_ratio": (0, "greater than 0"),
    "bicro.division": ("kmeans", "'bmm' or 'gmm'"),
    "bicro.clean_threshold": (1.5, "less than or equal to 1"),
    "bicro.noisy_label_threshold": (-0.1, "greater than or equal to 0"),
    "bicro.anchor_top_k": (-1, "greater than or equal to 0"),
    "bicro.top_anchors": (-2, "greater than or equal to -1"),
    "bicro.weight_decay": (INF, "finite number"),
    "bicro.dropout": (1, "less than 1"),
    "bicro.lr_schedule": ("linear", "'cosine', 'constant' or 'step'"),
    "bicro.grad_clip": (INF, "finite number"),
    "bicro.noisy_start": (2, "less than or equal to 1"),
    "bicro.drop_zero_labels": ("maybe", "valid boolean"),
    "bicro.center_consistency": ("maybe", "valid boolean"),
    "bicro.train_consistency_floor": (2, "less than or equal to 1"),
    "bicro.bank_size": (1, "greater than 1"),
    "bicro.mixture_iterations": (0, "greater than 0"),
    "bicro.threads": (100_000, "100000 is more than 1024"),
    "bicro.anchor_index": ("hnsw", "'auto', 'flat', 'ivf' or 'pca'"),
    "bicro.ivf_nlist": (-1, "greater than or equal to 0"),
    "bicro.ivf_nprobe": (0, "greater than or equal to 1"),
    "bicro.calibration_folds": (1, "1 fold cannot cross-fit"),
    "bicro.anchor_margins": ("yes", "'auto', 'on' or 'off'"),
    "bicro.fit_sample": (1, "1 is too small: 0 (every pair) or at least 2"),
    "select.column": ("nope", "'clean_score'"),
    "select.threshold": (2, "threshold 2 is outside [0, 1]"),
    "select.keep_fraction": (0, "greater than 0"),
    "out.keep_embeddings": ("maybe", "valid boolean"),
    "out.maxcount": (0, "greater than 0"),
    "out.maxsize": (0, "greater than 0"),
    "out.overwrite": ("maybe", "valid boolean"),
    "runner.kind": ("slurm", "'local', 'dask', 'ray' or 'none'"),
    "runner.workers": (0, "greater than 0"),
    "runner.processes": ("maybe", "valid boolean"),
    "runner.dask_address": (8786, "valid string"),
    "runner.cuda_cluster": (True, "cuda_cluster needs kind 'dask'"),
    "runner.ray_address": (10001, "valid string"),
    "checkpoint": ("/no/such/folder", "checkpoint error: /no/such/folder is not a checkpoint folder"),
}
# checked by the CLI after the config is built, still before any work: the input by listing it, a checkpoint by
# reading its description
CHECKED_BY_THE_CLI = {"input", "checkpoint"}

# Values the config accepted before and that failed later (after embedding, or when the model loaded), as
# (dotted field -> value) settings and the words of the line they now get up front.
LATE: list[tuple[dict[str, Any], str]] = [
    ({"embed.encoder": "tower"}, "embed.encoder: unknown encoder 'tower' (did you mean 'towers'?)"),
    ({"embed.encoder": "towers:resnet"}, "unknown image tower 'resnet'"),
    ({"embed.encoder": "towers:timm/resnet18"}, "unknown image tower 'timm/resnet18'"),
    ({"embed.encoder": "towers:timm/resnet18=/no/such.pt"}, "timm checkpoint /no/such.pt does not exist"),
    ({"embed.encoder": "towers::/no/such/folder"}, "text tower '/no/such/folder' is not minilm or a local"),
    ({"embed.encoder": "open_clip"}, "use open_clip:MODEL or open_clip:MODEL:TAG_OR_PATH"),
    ({"embed.encoder": "open_clip:ViT-B-33:openai"}, "open_clip has no model 'ViT-B-33' (did you mean 'ViT-B-32'?)"),
    ({"embed.encoder": "open_clip:ViT-B-32:laion5b"}, "has no pretrained tag 'laion5b'"),
    ({"embed.encoder": "open_clip:ViT-B-32:/no/such.pt"}, "open_clip checkpoint /no/such.pt does not exist"),
    ({"embed.encoder": "tiny:big"}, "tiny takes no arguments"),
    ({"embed.encoder": ""}, "empty encoder spec"),
    ({"embed.device": "cuda:x"}, "'cuda:x' is not auto"),
    ({"bicro.fit_sample": 1}, "bicro.fit_sample: 1 is too small"),
    ({"bicro.seed": 2**32}, "4294967296 is outside [0, 4294967295]"),
    ({"bicro.lr": float("nan")}, "bicro.lr"),
    ({"bicro.alpha": INF}, "bicro.alpha: Input should be a finite number"),
    ({"bicro.soft_margin_base": INF}, "finite number"),
    ({"bicro.warmup_epochs": 9}, "warmup_epochs must not exceed epochs"),
    ({"select.column": "encoder_cosine", "embed.encoder": "towers"}, "encoder_cosine needs an aligned encoder"),
    ({"output": "  "}, "empty output folder"),
]

# The same values are fine where they should be: these pass the config (no file is needed, nothing downloads).
GOOD: list[dict[str, Any]] = [
    {"embed.encoder": "towers:efficientnet-lite0:minilm"},
    {"embed.encoder": "towers::minilm"},
    {"embed.encoder": "open_clip:ViT-B-32"},
    {"embed.encoder": "open_clip:ViT-B/32:LAION2B-s34b-b79k"},  # open_clip's own spellings of name and tag
    {"embed.encoder": "tiny", "select.column": "encoder_cosine"},
    {"embed.device": "cuda:1"},
    {"bicro.fit_sample": 0, "bicro.seed": 2**32 - 1, "bicro.threads": 1024},
    {"bicro.fit_sample": 2},
]


def _nested(settings: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base or {}))
    for dotted, value in settings.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "shards").mkdir()
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "shards" / name).write_bytes(b"x")  # listed, never read: every case stops before reading
    return tmp_path


def _run(tree: Path, runner: str, settings: dict[str, Any]):
    """`bicro-clean run -c FILE` with `settings` over a valid input/output and the runner; returns the result."""
    base = {"input": str(tree / "shards"), "output": str(tree / "out"), "runner": {"kind": runner}}
    config = tree / "run.yaml"
    config.write_text(yaml.safe_dump(_nested(settings, base)))
    return CliRunner().invoke(cli.app, ["run", "-c", str(config)])


def _assert_one_line(result, expected: str) -> None:
    assert result.exit_code == 2, (expected, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], (expected, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_every_field_has_a_bad_value():
    assert set(BAD) == config_fields(CleanConfig)


def test_the_users_reference_lists_every_field():
    rows = re.findall(r"^\| `([a-z_.]+)` \|", (ROOT / "docs" / "config.md").read_text(), re.M)
    assert sorted(rows) == sorted(config_fields(CleanConfig)) and len(rows) == len(set(rows))


@pytest.mark.parametrize("field", sorted(set(BAD) - CHECKED_BY_THE_CLI))
def test_a_bad_value_is_rejected_by_the_config(field):
    with pytest.raises(ValidationError) as caught:
        CleanConfig.model_validate(_nested({field: BAD[field][0]}, {"input": "shards", "output": "out"}))
    error = caught.value.errors()[0]
    assert ".".join(map(str, error["loc"])) in (field, field.split(".")[0])  # a cross-field check names its section


@pytest.mark.parametrize("runner", ["none", "local"])
def test_run_refuses_each_bad_value_before_any_work(tree, guarded, runner):  # noqa: F811
    for field, (value, expected) in BAD.items():
        _assert_one_line(_run(tree, runner, {field: value}), expected)


@pytest.mark.parametrize("runner", ["none", "local"])
def test_values_that_failed_late_are_refused_up_front(tree, guarded, runner):  # noqa: F811
    for settings, expected in LATE:
        _assert_one_line(_run(tree, runner, settings), expected)


def test_good_values_pass():
    for settings in GOOD:
        CleanConfig.model_validate(_nested(settings, {"input": "shards", "output": "out"}))


def test_local_files_named_by_the_spec_are_accepted(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "ckpt.pt").write_bytes(b"")
    for spec in (f"towers:timm/resnet18={tmp_path}/ckpt.pt:{tmp_path}/text", f"open_clip:ViT-B-32:{tmp_path}/ckpt.pt"):
        assert CleanConfig.model_validate({"input": "s", "output": "o", "embed": {"encoder": spec}})


def test_one_grammar_parses_for_the_config_and_the_loader():
    from bicro_clean.models import encoders
    from bicro_clean.models.encoder_spec import EncoderSpec, parse_encoder_spec

    assert encoders.parse_encoder_spec is parse_encoder_spec
    assert parse_encoder_spec("towers:timm/resnet18=/c.pt:/t") == EncoderSpec("towers", "timm/resnet18=/c.pt", "/t")
    assert parse_encoder_spec("towers:timm/resnet18=/c.pt:/t").timm == ("resnet18", "/c.pt")
    assert parse_encoder_spec("open_clip:ViT-B-32:/a:b.pt") == EncoderSpec("open_clip", model="ViT-B-32",
                                                                            pretrained="/a:b.pt")
    assert not parse_encoder_spec("towers").aligned and parse_encoder_spec("tiny").aligned


# ------------------------------------------------------------------------------------------------ YAML


def _laughs(path: Path) -> Path:
    """A few hundred bytes of nested aliases under unknown keys: 9^10 strings once expanded."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    lines.append(f"unknown: [{', '.join(['*a9'] * 9)}]")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_yaml_aliases_and_anchors_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"laughs.yaml: YAML aliases/anchors are not supported \(line 1, column 5\)"):
        load_yaml(_laughs(tmp_path / "laughs.yaml"))
    (tmp_path / "anchor.yaml").write_text("embed: &e {batch_size: 4}\n")
    with pytest.raises(ValueError, match="aliases/anchors are not supported"):
        load_yaml(tmp_path / "anchor.yaml")
    (tmp_path / "deep.yaml").write_text("input: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_yaml(tmp_path / "deep.yaml")


def test_what_the_config_command_writes_loads_back(tmp_path):
    shared = ["a/*.tar", "b/*.tar"]
    text = dump_yaml({"input": shared, "output": "out", "again": shared})  # safe_dump would write &id001 / *id001
    assert "&" not in text and "*id" not in text
    (tmp_path / "printed.yaml").write_text(text)
    assert load_yaml(tmp_path / "printed.yaml")["again"] == shared


@pytest.mark.parametrize("runner", ["none", "local"])
def test_yaml_that_is_not_a_config_is_one_line(tree, guarded, runner):  # noqa: F811
    cases = {"date.yaml": ("input: 2020-01-01\n", "config error: input"),
             "scalar.yaml": ("embed: 5\n", "config error: embed: must be a mapping, not 5"),
             "deep.yaml": ("input: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply")}
    for name, (text, expected) in cases.items():
        (tree / name).write_text(text)
        result = CliRunner().invoke(cli.app, ["run", "-c", str(tree / name), "--runner", runner, "--encoder", "tiny",
                                              "--out", str(tree / "out")])
        _assert_one_line(result, expected)


# ------------------------------------------------------------------------------------------------ the real process


def _measured_cases(tree: Path) -> list[tuple[list[str], str]]:
    (tree / "tower.yaml").write_text("embed:\n  encoder: tower\n")
    return [
        (["-c", str(tree / "tower.yaml")], "config error: embed.encoder: unknown encoder 'tower'"),
        (["--encoder", "tiny", "--fit-sample", "1"], "config error: bicro.fit_sample: 1 is too small"),
        (["-c", str(_laughs(tree / "laughs.yaml"))], "YAML aliases/anchors are not supported"),
    ]


@pytest.mark.parametrize("runner", ["none", "local"])
def test_the_measured_cases_stop_in_seconds_with_one_line(tree, runner):
    """Before: 127 s then a traceback; embedding everything then 112 lines; a hang. The real console script."""
    for args, expected in _measured_cases(tree):
        start = time.monotonic()
        done = subprocess.run([str(SCRIPT), "run", "--runner", runner, "--input", str(tree / "shards"),
                               "--out", str(tree / "out"), *args], capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - start
        assert done.returncode == 2 and done.stdout == "", (args, done.stderr[-2000:])
        assert len(done.stderr.splitlines()) == 1 and expected in done.stderr, done.stderr[-2000:]
        assert seconds < 30, (args, seconds)  # the interpreter and the CLI's imports: ~2 s on an idle core
        assert not (tree / "out" / "embeddings").exists()


def test_open_clip_bicro_tiny_loads_in_a_fresh_process(tmp_path):
    """The check accepts open_clip:bicro-tiny:CHECKPOINT in any process, so the loader registers the config too."""
    import torch

    from bicro_clean.models.encoders import load_encoder

    tiny = load_encoder("tiny", "cpu")
    torch.save({"state_dict": tiny.model.state_dict()}, tmp_path / "tiny.pt")
    code = ("from bicro_clean.models.encoders import load_encoder; "
            f"print(load_encoder('open_clip:bicro-tiny:{tmp_path}/tiny.pt', 'cpu').describe()['weights'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == tiny.describe()["weights"], done.stderr[-2000:]
