"""`bicro-clean` command line. Each command builds one CleanConfig (YAML + flags) and calls plain stage functions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from pipeline.config import CleanConfig, load_yaml, merge_overrides

logger = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Clean image-text datasets with BiCro.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file with any CleanConfig fields.")


def _format_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"config error: {field}: {first['msg']}{more}"


def build_config(config_file: Optional[Path], overrides: dict[str, Any]) -> CleanConfig:
    """YAML first, flags on top; a bad value exits with code 2 and a one-line message naming the field."""
    try:
        return CleanConfig.model_validate(merge_overrides(load_yaml(config_file), overrides))
    except ValidationError as error:
        typer.echo(_format_validation_error(error), err=True)
        raise typer.Exit(2)
    except (OSError, ValueError) as error:
        typer.echo(f"config error: {error}", err=True)
        raise typer.Exit(2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command("make-shards")
def make_shards_cmd(
    images: Path = typer.Option(..., exists=True, file_okay=False, help="Folder of images."),
    captions: Path = typer.Option(..., exists=True, dir_okay=False, help="CSV with columns image,caption."),
    out: Path = typer.Option(..., help="Output folder for 00000.tar, 00001.tar, ..."),
    shard_size: int = typer.Option(1000, min=1, help="Samples per shard."),
    split_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="JSON {split: [image names]}."),
    split: Optional[str] = typer.Option(None, help="Which split of --split-file to write."),
    noise_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Fraction of captions given another image."),
    noise_seed: int = typer.Option(0, help="Seed of the noise draw."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images (quick demos)."),
) -> None:
    """Turn an image folder and a captions CSV into img2dataset-style WebDataset shards."""
    from pipeline.make_shards import make_shards

    if (split_file is None) != (split is None):
        typer.echo("config error: --split-file and --split go together", err=True)
        raise typer.Exit(2)
    summary = make_shards(
        images_dir=images,
        captions_csv=captions,
        out_dir=out,
        shard_size=shard_size,
        split_file=split_file,
        split=split,
        noise_rate=noise_rate,
        noise_seed=noise_seed,
        limit_images=limit,
    )
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:  # pragma: no cover - console entry point
    app()


def _embed_overrides(input: Optional[list[str]], out: Optional[str], encoder: Optional[str],
                     batch_size: Optional[int], workers: Optional[int], device: Optional[str]) -> dict[str, Any]:
    return {"input": input or None, "output": out, "embed.encoder": encoder, "embed.batch_size": batch_size,
            "embed.num_workers": workers, "embed.device": device}


@app.command("embed")
def embed_cmd(
    input: Optional[list[str]] = typer.Option(None, "--input", "-i", help="Shard spec (repeatable)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory."),
    encoder: Optional[str] = typer.Option(None, help="towers | open_clip:MODEL:TAG_OR_PATH | tiny"),
    batch_size: Optional[int] = typer.Option(None, help="Images per model batch."),
    workers: Optional[int] = typer.Option(None, help="Decode worker processes."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    config_file: Optional[Path] = ConfigOpt,
) -> None:
    """Embed every shard into OUT/embeddings/<shard>.parquet (cached per shard)."""
    from pipeline.embed import embed_shards

    cfg = build_config(config_file, _embed_overrides(input, out, encoder, batch_size, workers, device))
    results = embed_shards(cfg)
    totals = {k: sum(getattr(r, k) for r in results) for k in ("samples", "embedded", "errors")}
    totals.update(shards=len(results), cached=sum(r.cached for r in results))
    typer.echo(json.dumps(totals))
