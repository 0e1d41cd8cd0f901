"""Fit once, score anywhere: a run that applies the fitted model of an earlier run instead of fitting its own.

A checkpoint folder (`checkpoint/bicro-<key>/`, pipeline/fit.py) holds the model files and, beside them,
`encoder.json`: the encoder whose embeddings the model was fitted on, as the embed stage describes it (spec, kind,
dimensions, weights digest). The sequence records it after every fit (`record_encoder`); a run given
`checkpoint:` checks it twice: the spec against the run's `embed.encoder` before any work (`checkpoint_problem`),
and the whole description against what the run's embeddings were made with once they exist (`given_checkpoint`).
Scores made with a model fitted on another encoder's space would be numbers without meaning, so both refuse.

encoder.json is not one of the model files `pipeline.score.checkpoint_sha256` hashes: the content hash that keys
every score file is the model's alone, the same whether or not the folder has the record.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import fsspec

from bicro_clean.models.encoder_spec import EncoderSpecError, parse_encoder_spec
from bicro_clean.pipeline.config import CleanConfig
from bicro_clean.pipeline.layout import checkpoint_path
from bicro_clean.pipeline.parquet_io import atomic_output, file_sha256, join
from bicro_clean.pipeline.resume import exists
from bicro_clean.pipeline.writers import read_json, write_json_atomic

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.json"


class CheckpointError(ValueError):
    """A `checkpoint:` folder this run cannot use; the message is one line."""


def record_encoder(checkpoint: str, encoder: dict[str, Any]) -> None:
    """Write `encoder.json` into a checkpoint folder this run fitted, unless it already says the same (a reused
    fit, or a rerun); a folder fitted before the record existed gets it on its next run."""
    path = join(checkpoint, ENCODER_FILE)
    if read_json(path) != encoder:
        write_json_atomic(path, encoder)


def recorded_encoder(checkpoint: str) -> dict[str, Any]:
    """The encoder a complete checkpoint folder records; CheckpointError (one line) for anything else."""
    from bicro_clean.pipeline.score import CHECKPOINT_FILES  # torch: imported only when a checkpoint is given

    if not checkpoint.strip():
        raise CheckpointError("empty checkpoint folder")
    missing = [name for name in (*CHECKPOINT_FILES, ENCODER_FILE) if not exists(join(checkpoint, name))]
    if len(missing) == len(CHECKPOINT_FILES) + 1:
        raise CheckpointError(f"{checkpoint} is not a checkpoint folder (no {', '.join(missing)}); give a "
                              "checkpoint/bicro-<key>/ folder of an earlier run")
    if missing:
        hint = (f" (a fit made before {ENCODER_FILE} was recorded: rerun that run once to record it)"
                if missing == [ENCODER_FILE] else " (its fit was cut off: rerun that run to finish it)")
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint folder: {', '.join(missing)} missing{hint}")
    model = read_json(join(checkpoint, CHECKPOINT_FILES[-1]))
    encoder = read_json(join(checkpoint, ENCODER_FILE))
    if not isinstance(model, dict) or "format_version" not in model:
        raise CheckpointError(f"{checkpoint}: {CHECKPOINT_FILES[-1]} is not a BiCro model description")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("spec"), str):
        raise CheckpointError(f"{checkpoint}: {ENCODER_FILE} is not an encoder description")
    return encoder


def _same_spec(recorded: str, asked: str) -> bool:
    """Two spellings of one encoder (`towers` and `towers:efficientnet-lite0:minilm`) are the same encoder."""
    try:
        return parse_encoder_spec(recorded) == parse_encoder_spec(asked)
    except EncoderSpecError:
        return recorded == asked


def checkpoint_problem(config: CleanConfig) -> str | None:
    """Why `config.checkpoint` cannot be used by this run, checked before any work (no model loads), or None."""
    if config.checkpoint is None:
        return None
    try:
        encoder = recorded_encoder(config.checkpoint)
    except CheckpointError as error:
        return str(error)
    if not _same_spec(encoder["spec"], config.embed.encoder):
        return (f"{config.checkpoint} was fitted on embeddings of encoder {encoder['spec']!r}, this run embeds with "
                f"{config.embed.encoder!r}; use --encoder {encoder['spec']} or fit a model for this encoder")
    return None


def up_front_problem(config: CleanConfig) -> tuple[str, str] | None:
    """(kind, one line) for what stops this run before any work, that only this machine can tell: CUDA asked for
    where there is none (torch is imported only then), a checkpoint it cannot use; None when neither."""
    if config.embed.device.startswith("cuda"):
        from bicro_clean.models.devices import device_problem

        if problem := device_problem(config.embed.device):
            return "device", problem
    problem = checkpoint_problem(config)
    return ("checkpoint", problem) if problem else None


def check_checkpoint(config: CleanConfig) -> None:
    """`checkpoint_problem` as an error: the flow's and the sequence's up-front check."""
    problem = checkpoint_problem(config)
    if problem:
        raise CheckpointError(problem)


def _copy_into(checkpoint: str, target: str, names: tuple[str, ...]) -> None:
    """Copy the folder's files into `target` file by file, each atomically and in order (model.json, the marker of
    a complete folder, last); a file already there with the same bytes is left as it is (a rerun copies nothing)."""
    for name in names:
        source, copy = join(checkpoint, name), join(target, name)
        if exists(copy) and file_sha256(copy) == file_sha256(source):
            continue
        with atomic_output(copy) as tmp, fsspec.open(tmp, "wb") as dst, fsspec.open(source, "rb") as src:
            shutil.copyfileobj(src, dst)


def given_checkpoint(checkpoint: str, encoder: dict[str, Any], output: str) -> str:
    """The fit stage of a run given a checkpoint: nothing fitted. The folder is checked against the encoder the
    run's embeddings were made with (weights included: a changed local checkpoint file under the same spec) and
    copied into this run's `checkpoint/` under its own name, so the output folder is whole on its own (the manifest
    and the report name a checkpoint inside it) and every partition records the same checkpoint entry."""
    from bicro_clean.pipeline.score import CHECKPOINT_FILES

    recorded = recorded_encoder(checkpoint)
    if recorded != encoder:
        differing = sorted(k for k in {*recorded, *encoder} if recorded.get(k) != encoder.get(k))
        raise CheckpointError(f"{checkpoint} was fitted on another encoder than this run's embeddings "
                              f"(differs in {', '.join(differing)}); fit a model for this encoder")
    name = checkpoint.rstrip("/").rsplit("/", 1)[-1].removeprefix("bicro-")
    target = checkpoint_path(output, name or "given")
    if target.rstrip("/") != checkpoint.rstrip("/"):
        _copy_into(checkpoint, target, (ENCODER_FILE, *CHECKPOINT_FILES))
    logger.info("fit: skipped, scoring with the given checkpoint %s (as %s)", checkpoint, target)
    return target
