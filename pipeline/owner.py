"""An output folder has one owner: the configuration that wrote it.

Two rules keep a finished run from being destroyed by the next one:

- A run never reads its own outputs. `bicro-clean run --input 'data/**/*.tar' --out data/clean` would find its
  own cleaned shards (`data/clean/shards/*.tar`) on a rerun and rewrite files it is reading; every input inside
  `--out` is skipped with a note (`outside_output`). Local paths are compared after resolving symlinks, URLs as
  their filesystem spells them.
- The configuration that shaped the outputs is recorded in `OUT/run-config.json` before any work (`claim_output`):
  the same fields `resume.config_hash` hashes (not input/output paths, the runner or speed-only embed settings).
  A run whose recorded fields differ is refused before any model loads (`owner_problem`: one line naming the
  fields) unless `out.overwrite` (`--overwrite`) is set. With it the run takes the folder over; every stage cache
  that is still valid is reused, because each stage keys its cache on what made it (pipeline/resume.py).
  A selection-only change (threshold, column, keep fraction) is refused too: the earlier decisions, cleaned shards
  and keep_keys are a result someone may already be using; with `--overwrite` it costs no recompute.

`manifest.json` describes the outputs; it is removed when a run starts rewriting them (`retire_manifest`) and
written again last, by the finalize stage, so it never lists a file that has since changed.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Any

import fsspec

from bicro_clean.pipeline.config import CleanConfig, dotted_fields
from bicro_clean.pipeline.layout import MANIFEST, RUN_CONFIG
from bicro_clean.pipeline.outlock import OutputError
from bicro_clean.pipeline.parquet_io import join
from bicro_clean.pipeline.resume import RUNTIME_ONLY, config_hash
from bicro_clean.pipeline.shards import MissingInputError
from bicro_clean.pipeline.writers import read_json, write_json_atomic

logger = logging.getLogger(__name__)
SHOWN_FIELDS = 4  # differing fields the refusal spells out with their values; the rest are counted


class OutputOwnedError(OutputError):
    """--out holds the outputs of another configuration and `out.overwrite` is off (one line, exit 2)."""


# ------------------------------------------------------------------------------------------- inputs inside --out


def _local_path(url: str) -> str | None:
    """A local shard's path resolved (a symlink into --out is inside it), or None for a URL or a pipe: command."""
    protocol, path = fsspec.core.split_protocol(url)
    if url.startswith(("/", "./")) or protocol is None:  # names a listing found are spelled so (shards.local_path)
        return None if url.startswith("pipe:") else os.path.realpath(os.path.expanduser(url))
    return os.path.realpath(path) if protocol in ("file", "local") else None


def _place(url: str) -> tuple[str, str] | None:
    """(filesystem, path): where `url` lives, one spelling per place. A local path is resolved; a URL is spelled as
    its filesystem strips it (the last URL of a chain is the file). None for a pipe: command or a URL no installed
    backend reads."""
    local = _local_path(url)
    if local is not None or url.startswith("pipe:"):
        return None if local is None else ("file", local)
    try:
        fs, stripped = fsspec.core.url_to_fs(url.rpartition("::")[2])
    except (ImportError, OSError, ValueError):  # unknown protocol or backend: it cannot be our output either
        return None
    name = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return name, stripped.rstrip("/")


def _inside(shard: str, folder: tuple[str, str] | None) -> bool:
    if folder is None:
        return False
    # a local --out holds no URL: a remote shard is not even parsed (10k URLs, one filesystem lookup each)
    place = ("file", _local_path(shard)) if folder[0] == "file" else _place(shard)
    if place is None or place[1] is None or place[0] != folder[0]:
        return False
    return place[1] == folder[1] or place[1].startswith(folder[1].rstrip("/") + "/")


def outside_output(config: CleanConfig, shards: list[str], note: bool = True) -> list[str]:
    """`shards` less those inside `config.output` (this run's own outputs, never its inputs); logs how many were
    skipped when `note`. MissingInputError (one line) when nothing is left."""
    folder = _place(config.output)
    kept = [shard for shard in shards if not _inside(shard, folder)]
    skipped = len(shards) - len(kept)
    if not kept:
        raise MissingInputError(f"no shard matches {config.input!r} outside --out {config.output!r} (the {skipped} "
                                "found there are outputs of a run, never read as its input)")
    if skipped and note:
        logger.warning("input: skipped %d of %d shards inside --out %s (a run never reads its own outputs)",
                       skipped, len(shards), config.output)
    return kept


# ------------------------------------------------------------------------------------------------- the owner


def owned_config(config: CleanConfig) -> dict[str, Any]:
    """The fields that shape the outputs: what `resume.config_hash` hashes, and the fitted model a run was given."""
    owned = config.model_dump(mode="json", exclude={"input": True, "output": True, "runner": True,
                                                    "embed": RUNTIME_ONLY})
    # `checkpoint` stays out of the config hashes (the score cache keys on the model's content), but a run scored
    # with another model is another owner; its folder name, bicro-<fit key>, names the model wherever it lies
    owned["checkpoint"] = posixpath.basename(config.checkpoint.rstrip("/")) if config.checkpoint else None
    return owned


def recorded_owner(output: str) -> dict[str, Any] | None:
    """The config recorded in `output`: its run-config.json, else (a folder written before the record existed) the
    config in its manifest; None for a new folder."""
    record = read_json(join(output, RUN_CONFIG))
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        return record["config"]
    manifest = read_json(join(output, MANIFEST))
    if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
        return {name: value for name, value in manifest["config"].items() if name != "input"}
    return None


def differing_fields(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted field, recorded value, current value) for every field both configs have and set differently, in
    declaration order. A field only one side has (added or removed by another package version) is not a
    difference: an upgrade alone must not lock a user out of their folder."""
    old, new = dotted_fields(recorded), dotted_fields(current)
    return [(name, old[name], value) for name, value in new.items() if name in old and old[name] != value]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refusal(output: str, differences: list[tuple[str, Any, Any]]) -> str:
    shown = ", ".join(f"{name} {_shown(old)} -> {_shown(new)}" for name, old, new in differences[:SHOWN_FIELDS])
    more = f" and {len(differences) - SHOWN_FIELDS} more" if len(differences) > SHOWN_FIELDS else ""
    scores_kept = all(name.startswith("select.") for name, _, _ in differences)
    reuse = "every score is reused" if scores_kept else "caches still valid, e.g. embeddings of the same encoder, " \
        "are reused"
    return (f"--out {output!r} holds the outputs of another configuration ({shown}{more}); rerun with --overwrite "
            f"to replace them ({reuse}) or use another --out")


def _differences(config: CleanConfig) -> list[tuple[str, Any, Any]]:
    recorded = recorded_owner(config.output)
    return [] if recorded is None else differing_fields(recorded, owned_config(config))


def owner_problem(config: CleanConfig) -> str | None:
    """Why this run may not write `config.output` (another configuration owns it, no --overwrite), or None."""
    differences = [] if config.out.overwrite else _differences(config)
    return refusal(config.output, differences) if differences else None


def retire_manifest(output: str) -> None:
    """Remove manifest.json before outputs it lists are rewritten: no manifest is better than a wrong one (the
    finalize stage writes it again, last)."""
    fs, path = fsspec.core.url_to_fs(join(output, MANIFEST))
    if fs.exists(path):
        fs.rm(path)


def claim_output(config: CleanConfig) -> None:
    """Record `config` as the owner of its output folder, before any work. OutputOwnedError when another
    configuration owns it and `out.overwrite` is off; with it, that configuration's manifest goes at once."""
    differences = _differences(config)
    if differences:
        if not config.out.overwrite:
            raise OutputOwnedError(refusal(config.output, differences))
        logger.warning("--overwrite: %s now belongs to this configuration (it was %s)", config.output,
                       ", ".join(f"{name} {_shown(old)}" for name, old, _ in differences))
        retire_manifest(config.output)
    path = join(config.output, RUN_CONFIG)
    record = {"config_hash": config_hash(config), "config": owned_config(config)}
    if read_json(path) != record:  # an unchanged record is not rewritten (one request less on a store)
        write_json_atomic(path, record)
