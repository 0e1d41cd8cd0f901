"""The one configuration model for every stage, the CLI and the Prefect flow.

Loaded from YAML (``--config run.yaml``) and overridden by CLI flags. Unknown keys are errors, so a typo in a
YAML file is reported instead of silently ignored; so are anchors and aliases (`&name`, `*name`): a few hundred
bytes of them expand into billions of values. Every value is checked here, when the config is built, so a bad one
is a one-line error before any work (docs/config.md lists each field, its range and the error it gets). The hash
of a section is what per-stage caches key on: changing a parameter that affects a stage's output invalidates
exactly that stage's cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bicro_clean.models.encoder_spec import check_encoder_spec, parse_encoder_spec
from bicro_clean.models.params import BiCroParams

# The smallest fit sample: negatives come from the batch, so BiCro trains on no fewer than two pairs (pipeline.fit
# refuses fewer). Measured with the tiny encoder: 1 embedded everything, then failed; 2, 3 and 4 fit and score.
FIT_SAMPLE_MIN = 2
# torch/faiss thread counts: far above any machine's cores, below what crashes torch (100,000 segfaulted).
MAX_THREADS = 1024
# Seeds go to numpy (which refuses negative ones) and, multiplied for the per-network streams, to torch's int64
# manual_seed (2**63 - 1 overflowed); 2**32 - 1 leaves room for both.
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    # no inf/NaN in any section: lr, weight_decay, ... set to .inf embedded everything, then failed with a traceback
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def digest(self) -> str:
        """Stable short hash of this section's values."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ReaderConfig(_Section):
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels are recorded as image_too_large (PIL's own bound)."
    )
    max_caption_bytes: int = Field(
        16_384, gt=0, description="Captions longer than this (UTF-8 bytes) are recorded as caption_too_long."
    )
    max_aspect_ratio: float = Field(
        20.0, ge=1, allow_inf_nan=False, description="Images whose longer side is more than this many times the "
        "shorter are recorded as image_aspect_ratio, before decoding: resizing the shorter side to the encoder's "
        "224 px would blow a 1x20000 strip up to 224x4,480,000 (a 164-byte PNG took 4.7 GB)."
    )
    max_decode_seconds: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="Images whose decode takes longer are recorded as "
        "decode_timeout (0 = no bound). Within the pixel bound a hostile file (thousands of progressive scans) can "
        "still take minutes; a photograph takes milliseconds."
    )
    max_member_bytes: int = Field(
        16 * 2**20, gt=0, description="Tar members are bounded by the size their header declares, before any of "
        "their bytes is read: .txt and .json members over 256 x max_caption_bytes, images over 4 bytes per pixel of "
        "max_image_pixels (+1 MiB), members of any other extension over max_member_bytes are recorded as "
        "member_too_large and skipped unread. One member's PAX, GNU long-name or sparse header data over "
        "max_member_bytes makes the shard shard_corrupt."
    )
    allow_pipe: bool = Field(False, description="Allow pipe: shard URLs, which run shell commands.")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class EmbedConfig(_Section):
    encoder: str = Field("towers", description="towers | towers:IMAGE:TEXT | open_clip:MODEL:TAG_OR_PATH | tiny")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    batch_size: int = Field(64, gt=0)
    num_workers: int = Field(
        default_factory=lambda: usable_cores(), ge=0,
        description="DataLoader worker processes decoding images and tokenising captions; default: every core this "
        "process may use (sched_getaffinity). 0 = decode in the main process."
    )
    autocast: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    threads: int = Field(
        0, ge=0, le=MAX_THREADS, description="torch threads for the model; 0 = every core this process may use. Set "
        "explicitly "
        "because Dask workers default to 1 and float results depend on the thread count."
    )
    progress: bool = Field(True, description="Show a progress bar.")
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="How image_emb/text_emb are stored. float16 halves the bytes (unit vectors: ~3 "
        "significant digits, soft_label AUROC unchanged on Flickr8k); readers always get float32 back."
    )
    jpeg_decode: Literal["auto", "cpu", "device"] = Field(
        "auto", exclude=True, description="Where JPEGs are decoded. cpu: PIL in the decode workers (reduced-size DCT "
        "decode). device: the workers ship the JPEG bytes and the main process decodes them in batches with "
        "torchvision's decode_jpeg on the encoder's device (nvJPEG on CUDA), resizing there; anything it refuses "
        "takes the CPU path, same reason codes. auto: device when the encoder runs on CUDA, else cpu. 'device' with "
        "a CPU encoder runs torchvision's CPU decode_jpeg in batches (used by the tests). Left out of the config "
        "hashes (exclude): the embed cache key records the effective path, and only when it is device."
    )

    @field_validator("encoder")
    @classmethod
    def _encoder_spec_loads(cls, spec: str) -> str:
        # syntax, tower and model names, pretrained tags, local files: what loading the encoder would find only
        # after the input is listed and Prefect started (a typo'd `tower` failed minutes in, with a traceback)
        check_encoder_spec(spec)
        return spec

    @field_validator("device")
    @classmethod
    def _device_spelled(cls, device: str) -> str:
        # only the spelling: whether CUDA is there is known where the encoder loads (a Dask worker may have it)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError(f"{device!r} is not auto, cpu, cuda, cuda:N or mps")
        return device


class BiCroConfig(BiCroParams, _Section):
    """The `bicro:` section: every models.params.BiCroParams field (declared there, once) plus fit_sample."""

    fit_sample: int = Field(
        32_768, ge=0, description="Fit on this many pairs sampled uniformly from all shards (0 = all): a fixed cost, "
        "the same at 100k or 100M pairs. More pairs fit a better model: on Flickr8k at 40% noise (30,455 pairs) "
        "clean_score AUROC was 0.9815 fitting on 16,384 and 0.991 on all (docs/bicro.md); training the 16,384 "
        "longer (15 epochs) did not make up for it (0.973)."
    )

    # Bounds of inherited BiCroParams fields that only the pipeline's use hits; each failed after embedding.
    @field_validator("fit_sample")
    @classmethod
    def _fit_sample_fits(cls, value: int) -> int:
        if 0 < value < FIT_SAMPLE_MIN:
            raise ValueError(f"{value} is too small: 0 (every pair) or at least {FIT_SAMPLE_MIN}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int) -> int:
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"{value} is outside [0, {MAX_SEED}]")
        return value

    @field_validator("threads")
    @classmethod
    def _threads_bounded(cls, value: int) -> int:
        if value > MAX_THREADS:
            raise ValueError(f"{value} is more than {MAX_THREADS}")
        return value


COSINE_COLUMNS = ("match_score", "encoder_cosine")  # in [-1, 1]; every other score column is in [0, 1]


class SelectConfig(_Section):
    column: Literal[
        "clean_score", "soft_label", "p_clean", "consistency", "r_i2t", "r_t2i", "match_score", "encoder_cosine"
    ] = Field("clean_score", description="Score column the rule applies to. clean_score: calibrated P(clean), "
              "no ties; soft_label: BiCro's training label; encoder_cosine: aligned encoders only.")
    threshold: float = Field(0.5, allow_inf_nan=False, description="Keep rows whose column is >= threshold: in "
                             "[0, 1] for clean_score, soft_label, p_clean, consistency, r_i2t, r_t2i; [-1, 1] for "
                             "the cosines.")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="Keep this top fraction instead.")

    @model_validator(mode="after")
    def _threshold_in_the_column_range(self) -> "SelectConfig":
        # NaN or a value outside the column's range is a typo, never a rule: NaN would drop every row, and a
        # negative threshold on a [0, 1] column would keep every row without a word
        low = -1.0 if self.column in COSINE_COLUMNS else 0.0
        if not low <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold:g} is outside [{low:g}, 1], the range of {self.column}")
        return self


class OutputConfig(_Section):
    keep_embeddings: bool = False
    maxcount: int = Field(10_000, gt=0, description="Samples per cleaned output shard.")
    maxsize: int = Field(3_000_000_000, gt=0, description="Bytes per cleaned output shard.")
    overwrite: bool = Field(
        False, exclude=True, description="Let this run take over an output folder written with another "
        "configuration (without it such a run is refused before any work); caches still valid are reused. Left "
        "out of the config hashes (exclude): it changes who may write, never what is written."
    )


class RunnerConfig(_Section):
    """Where the flow's tasks run. Changes speed, never outputs: excluded from every output hash."""

    kind: Literal["local", "dask", "ray", "none"] = Field(
        "local", description="local: Prefect threads; dask: prefect-dask; ray: prefect-ray; none: no Prefect."
    )
    workers: int = Field(2, gt=0, description="Concurrent tasks (local threads or LocalCluster workers).")
    processes: bool = Field(False, description="local runner: processes instead of threads.")
    dask_address: str | None = Field(None, description="tcp://scheduler:8786; a LocalCluster when empty.")
    cuda_cluster: bool = Field(
        False, description="dask runner without dask_address: dask-cuda's LocalCUDACluster, one worker per visible "
        "GPU (CUDA_VISIBLE_DEVICES per worker; `workers` is then the GPU count). Needs the extra bicro-clean[gpu]."
    )
    ray_address: str | None = Field(None, description="ray://head:10001; a local Ray when empty.")

    @model_validator(mode="after")
    def _cuda_cluster_is_dask(self) -> "RunnerConfig":
        if self.cuda_cluster and (self.kind != "dask" or self.dask_address):
            raise ValueError("cuda_cluster needs kind 'dask' without dask_address (it starts its own cluster)")
        return self


class CleanConfig(_Section):
    """Everything a cleaning run needs. Only ``input`` and ``output`` have no default."""

    input: str | list[str] = Field(..., description="Shard spec: paths, globs, {000..099} braces or fsspec URLs.")
    output: str = Field(..., description="Output directory (local path or fsspec URL).")
    reader: ReaderConfig = ReaderConfig()
    embed: EmbedConfig = EmbedConfig()
    bicro: BiCroConfig = BiCroConfig()
    select: SelectConfig = SelectConfig()
    out: OutputConfig = OutputConfig()
    runner: RunnerConfig = RunnerConfig()
    checkpoint: str | None = Field(
        None, exclude=True, description="A fitted model, the checkpoint/bicro-<key>/ folder of an earlier run (local "
        "or fsspec URL): the fit is skipped and these shards are scored with it (fit once, score anywhere). Its "
        "encoder must be this run's. Left out of the config hashes (exclude): the scores and everything after them "
        "record the checkpoint's content hash, not where it lies."
    )

    @field_validator("output")
    @classmethod
    def _output_named(cls, output: str) -> str:
        if not output.strip():  # '' is the filesystem root to fsspec: a run wrote its folders into /
            raise ValueError("empty output folder")
        return output

    @model_validator(mode="after")
    def _column_needs_an_aligned_encoder(self) -> "CleanConfig":
        if self.select.column == "encoder_cosine" and not parse_encoder_spec(self.embed.encoder).aligned:
            raise ValueError(f"select.column encoder_cosine needs an aligned encoder (open_clip or tiny); "
                             f"{self.embed.encoder} is not aligned")
        return self


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: a nest of aliases is a few hundred bytes that expand to billions of values when
    the document is copied or validated (the config's merge copied it through JSON and hung)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):  # an anchor is only there for aliases
            mark = event.start_mark
            raise ValueError(f"YAML aliases/anchors are not supported (line {mark.line + 1}, column {mark.column + 1})")
        return super().compose_node(parent, index)


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.load(Path(path).read_text(), Loader=_NoAliasLoader) or {}  # noqa: S506 (a SafeLoader)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a value seen twice is written twice: load_yaml refuses aliases


def dump_yaml(values: dict[str, Any]) -> str:
    """`values` as YAML that load_yaml reads back: no aliases, keys in their order."""
    return yaml.dump(values, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True)


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (``{"embed.batch_size": 32}``) onto a nested dict; None means not given."""
    merged = copy.deepcopy(base)  # not a JSON round trip: YAML dates and int keys are for validation to name
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = merged
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # `embed: 5` under --batch-size: a config error, not a TypeError
                raise ValueError(f"{'.'.join(parents[:depth + 1])}: must be a mapping, not {node!r}")
        node[leaf] = value
    return merged


def dotted_fields(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dump as {"section.field": value}: how the owner check and the report name settings."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat
