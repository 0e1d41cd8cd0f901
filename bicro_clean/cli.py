"""`bicro-clean` command line. Each command builds one CleanConfig (YAML + flags) and calls plain stage functions."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from bicro_clean.pipeline.allocator import use_one_malloc_arena

use_one_malloc_arena()  # before Prefect, Dask or torch start threads (see pipeline/allocator.py)

# Before Prefect is imported (its settings are read then); a user's own value wins. No usage data leaves the
# machine: the temporary API server's analytics (offline they end in a red "Failed to send telemetry") and
# the client's SDK analytics (prefect/_internal/analytics honours DO_NOT_TRACK).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar

import typer  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from bicro_clean.run_summary import print_run_summary  # noqa: E402
from bicro_clean.cli_support import (  # noqa: E402
    CONFIG_OPT,
    DEVICE_OPT,
    ENCODER_OPT,
    INPUT_OPT,
    OUT_OPT,
    OVERWRITE_OPT,
    WORKERS_OPT,
    build_config,
    check_io,
    effective_yaml,
    start_terminal,
    stop_terminal,
    fail,
    format_validation_error,
    opt,
    version_callback,
)
from bicro_clean.cli_select import select_cmd  # noqa: E402
from bicro_clean.pipeline.config import CleanConfig, load_yaml  # noqa: E402
from bicro_clean.stop_signals import stop_on_signals  # noqa: E402

logger = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Clean image-text datasets with BiCro.")

__all__ = ["app", "build_config", "main", "run_with_runner"]


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="The full log: every library's INFO, bicro_clean's DEBUG."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the one-line result."),
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the package version and exit."),
) -> None:
    """By default: a progress bar per running stage on a terminal, one line per finished stage, a summary."""
    if verbose and quiet:
        raise fail("usage", "--verbose and --quiet exclude each other")
    start_terminal("verbose" if verbose else "quiet" if quiet else "default")
    ctx.call_on_close(stop_terminal)


_KIND_HELP = "shuffle | near-miss | alt-text | mix (README: Noise kinds)."
_MIX_HELP = "With --noise-kind mix: fraction of pairs of this kind (default {})."


@app.command("make-shards")
def make_shards_cmd(
    images: Path = typer.Option(..., exists=True, file_okay=False, help="Folder of images."),
    captions: Path = typer.Option(..., exists=True, dir_okay=False, help="CSV with columns image,caption."),
    out: Path = typer.Option(..., help="Output folder for 00000.tar, 00001.tar, ..."),
    shard_size: int = typer.Option(1000, min=1, help="Samples per shard."),
    split_file: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="JSON {split: \\[image names]}."),
    split: Optional[str] = typer.Option(None, help="Which split of --split-file to write."),
    noise_kind: str = typer.Option("shuffle", help=_KIND_HELP),
    noise_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Noisy fraction, one kind (default 0)."),
    shuffle_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=_MIX_HELP.format(0.15)),
    near_miss_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=_MIX_HELP.format(0.15)),
    alt_text_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=_MIX_HELP.format(0.10)),
    noise_seed: int = typer.Option(0, help="Seed of the noise draw."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images (quick demos)."),
) -> None:
    """Turn an image folder and a captions CSV into img2dataset-style WebDataset shards."""
    from bicro_clean.pipeline.make_shards import make_shards

    mix = {"shuffle": shuffle_rate, "near-miss": near_miss_rate, "alt-text": alt_text_rate}
    try:  # noise flags of the wrong kind, --split without --split-file, a bad CSV row or image: one line
        summary = make_shards(images, captions, out, shard_size, split_file, split, noise_rate or 0.0, noise_seed,
                              limit, noise_kind, mix)
    except (ValueError, FileNotFoundError) as error:
        raise fail("make-shards", error)
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:  # pragma: no cover - console entry point
    app()


def _embed_overrides(input: Optional[list[str]], out: Optional[str], encoder: Optional[str],
                     batch_size: Optional[int], workers: Optional[int], device: Optional[str]) -> dict[str, Any]:
    return {"input": input or None, "output": out, "embed.encoder": encoder, "embed.batch_size": batch_size,
            "embed.num_workers": workers, "embed.device": device}


@app.command("embed")
def embed_cmd(
    input: Optional[list[str]] = INPUT_OPT,
    out: Optional[str] = OUT_OPT,
    encoder: Optional[str] = ENCODER_OPT,
    batch_size: Optional[int] = opt("embed.batch_size", "--batch-size", help="Images per model batch."),
    workers: Optional[int] = WORKERS_OPT,
    device: Optional[str] = DEVICE_OPT,
    config_file: Optional[Path] = CONFIG_OPT,
) -> None:
    """Embed every shard into OUT/embeddings/<shard>.parquet (cached per shard)."""
    cfg = build_config(config_file, _embed_overrides(input, out, encoder, batch_size, workers, device))
    check_io(cfg)  # before the encoder loads
    from bicro_clean.pipeline.embed import embed_shards

    results = embed_shards(cfg)
    totals = {k: sum(getattr(r, k) for r in results) for k in ("samples", "embedded", "errors")}
    totals.update(shards=len(results), cached=sum(r.cached for r in results))
    typer.echo(json.dumps(totals))


def _run_overrides(**flags: Any) -> dict[str, Any]:
    names = {"input": "input", "out": "output", "encoder": "embed.encoder", "workers": "embed.num_workers",
             "device": "embed.device", "threshold": "select.threshold", "column": "select.column",
             "keep_fraction": "select.keep_fraction", "keep_embeddings": "out.keep_embeddings",
             "maxcount": "out.maxcount", "maxsize": "out.maxsize", "fit_sample": "bicro.fit_sample",
             "epochs": "bicro.epochs", "allow_pipe": "reader.allow_pipe", "runner": "runner.kind",
             "dask_address": "runner.dask_address", "ray_address": "runner.ray_address",
             "runner_workers": "runner.workers",
             "overwrite": "out.overwrite", "checkpoint": "checkpoint"}
    return {names[k]: (v or None) if k == "input" else v for k, v in flags.items()}


@app.command("run")
def run_cmd(
    input: Optional[list[str]] = INPUT_OPT,
    out: Optional[str] = OUT_OPT,
    encoder: Optional[str] = ENCODER_OPT,
    workers: Optional[int] = WORKERS_OPT,
    device: Optional[str] = DEVICE_OPT,
    column: Optional[str] = opt("select.column", "--column", help="Score column the selection rule uses."),
    threshold: Optional[float] = opt("select.threshold", "--threshold", help="Keep rows whose column >= threshold."),
    keep_fraction: Optional[float] = opt("select.keep_fraction", "--keep-fraction",
                                         help="Keep this top fraction instead of a threshold."),
    keep_embeddings: Optional[bool] = opt("out.keep_embeddings", "--keep-embeddings/--no-keep-embeddings",
                                          help="Keep the embedding columns in annotated/ and filtered/."),
    maxcount: Optional[int] = opt("out.maxcount", "--maxcount", help="Samples per cleaned output shard."),
    maxsize: Optional[int] = opt("out.maxsize", "--maxsize", help="Bytes per cleaned output shard."),
    fit_sample: Optional[int] = opt("bicro.fit_sample", "--fit-sample",
                                    help="Fit BiCro on this many sampled pairs (0 = all)."),
    epochs: Optional[int] = opt("bicro.epochs", "--epochs", help="BiCro training epochs."),
    allow_pipe: Optional[bool] = opt("reader.allow_pipe", "--allow-pipe/--no-allow-pipe", help="Allow pipe: URLs."),
    runner: Optional[str] = opt("runner.kind", "--runner", help="local | dask | ray | none (no Prefect)."),
    dask_address: Optional[str] = opt("runner.dask_address", "--dask-address",
                                      help="tcp://scheduler:8786 (none: a LocalCluster)."),
    ray_address: Optional[str] = opt("runner.ray_address", "--ray-address",
                                     help="HEAD:6379, auto or ray://HEAD:10001 (none: a local Ray)."),
    runner_workers: Optional[int] = opt("runner.workers", "--runner-workers",
                                        help="Concurrent tasks / LocalCluster workers."),
    overwrite: Optional[bool] = OVERWRITE_OPT,
    checkpoint: Optional[str] = opt("checkpoint", "--checkpoint", help="Score with this fitted model (an earlier "
                                    "run's checkpoint/bicro-<key>/ folder) instead of fitting one."),
    config_file: Optional[Path] = CONFIG_OPT,
) -> None:
    """The whole pipeline: embed -> fit BiCro -> score -> decide -> Parquet, cleaned shards, report.

    Runs the `clean-shards` Prefect flow in this process (ephemeral API, no server needed)."""
    flags = {k: v for k, v in locals().items() if k != "config_file"}
    cfg = build_config(config_file, _run_overrides(**flags))
    check_io(cfg, owner=True)  # before any model loads or Prefect starts
    from bicro_clean.pipeline.outlock import OutputBusyError, OutputError
    from bicro_clean.pipeline.shards import InputError
    from bicro_clean.models.devices import DeviceUnavailableError

    try:
        with stop_on_signals():  # Ctrl-C / SIGTERM: exit 130 / 143 in seconds, no process left (stop_signals.py)
            summary = run_with_runner(cfg)
    except InputError as error:  # the input changed after the check: still one line
        raise fail("input", error)
    except (OutputBusyError, OutputError) as error:  # also changed after the check
        raise fail("output", error)
    except DeviceUnavailableError as error:  # a worker without the GPU the run asked for (checked here up front)
        raise fail("device", error)
    print_run_summary(summary)


def config_cmd(**flags: Any) -> None:
    """Print the effective config as YAML: every field with the value `run` with these flags would use."""
    typer.echo(effective_yaml(flags.pop("config_file"), _run_overrides(**flags)), nl=False)  # pop goes first


# `config` takes exactly run's flags
config_cmd.__signature__ = inspect.signature(run_cmd)  # type: ignore[attr-defined]
config_cmd.__annotations__ = {**run_cmd.__annotations__}
app.command("config")(config_cmd)
app.command("select")(select_cmd)  # the run-wide select across partitions run apart (cli_select.py)


def run_with_runner(cfg: CleanConfig) -> dict[str, Any]:
    """`runner.kind == none` runs the stages directly; anything else goes through the Prefect flow."""
    if cfg.runner.kind == "none":
        from bicro_clean.pipeline.run import run_pipeline

        return run_pipeline(cfg)
    from bicro_clean.flows.ephemeral import start_early

    start_early()  # Prefect's temporary API server boots while the next import loads torch (flows/ephemeral.py)
    from bicro_clean.flows.clean_shards import run_flow

    return run_flow(cfg)


@app.command("serve")
def serve_cmd(name: str = typer.Option("local", help="Deployment name: clean-shards/<name>.")) -> None:
    """Serve the `clean-shards/<name>` deployment from this process (needs PREFECT_API_URL of a server)."""
    from bicro_clean.flows.clean_shards import clean_shards

    clean_shards.serve(name=name)


@app.command("evaluate")
def evaluate_cmd(
    data: Path = typer.Option(Path("../shared/data/flickr8k"), exists=True, file_okay=False,
                              help="Flickr8k folder (images/, captions.csv, splits.json)."),
    noise_kind: str = typer.Option("shuffle", help=_KIND_HELP),
    noise_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Noisy fraction, one kind (default 0.4)."),
    shuffle_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=_MIX_HELP.format(0.15)),
    near_miss_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=_MIX_HELP.format(0.15)),
    alt_text_rate: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=_MIX_HELP.format(0.10)),
    seed: int = typer.Option(0),
    methods: str = typer.Option("bicro,ncr,vanilla,oracle", help="Comma-separated: bicro,ncr,vanilla,cosine,oracle."),
    out: Path = typer.Option(Path("results.json")),
    cache_dir: Path = typer.Option(Path(".cache/bicro-clean"), help="Where benchmark embeddings are cached."),
    device: str = typer.Option("cpu"),
    config_file: Optional[Path] = CONFIG_OPT,
) -> None:
    """Noise detection (overall, per noise kind) and retrieval of BiCro, NCR, vanilla, cosine, oracle on Flickr8k."""
    from bicro_clean.lab.evaluate import evaluate
    from bicro_clean.models.params import BiCroParams

    from bicro_clean.pipeline.noise_kinds import resolve_rates

    try:
        rates = resolve_rates(noise_kind, noise_rate, {"shuffle": shuffle_rate, "near-miss": near_miss_rate,
                                                       "alt-text": alt_text_rate}, default_rate=0.4)
    except ValueError as error:
        raise fail("config", error)
    section = load_yaml(config_file).get("bicro", {}) if config_file else {}
    result = evaluate(data, rates, seed, [m.strip() for m in methods.split(",") if m.strip()],
                      out, cache_dir, BiCroParams.from_dict(section), device)
    typer.echo(json.dumps(result, indent=2))


@app.command("evaluate-table")
def evaluate_table_cmd(
    results: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="results.json files of `evaluate`."),
) -> None:
    """Print a Markdown table of several `evaluate` results (e.g. one per noise level)."""
    from bicro_clean.lab.evaluate import results_table

    typer.echo(results_table([json.loads(p.read_text()) for p in results]))


@app.command("bench")
def bench_cmd(
    out: Path = typer.Option(Path("bench.json"), help="Where to write the JSON figures."),
    quick: bool = typer.Option(False, "--quick", help="Skip the 1M-pair fit and use fewer pairs: a few minutes."),
    data: Path = typer.Option(Path("../shared/data/flickr8k"), help="Real JPEGs for the decode stage, when present."),
    append: Optional[bool] = typer.Option(None, "--append/--no-append", help="Append the Markdown table to "
                                          "docs/benchmarks.md (default: yes for the suite, no for --e2e)."),
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help="Seconds-long run of every path (tests)."),
    embed_only: bool = typer.Option(False, "--embed-only", help="Only the older embed benchmark (--pairs)."),
    e2e: bool = typer.Option(False, "--e2e", help="The whole job with default settings vs `embed` alone, measured."),
    pairs: Optional[int] = typer.Option(None, min=8, help="Pairs: --embed-only (default 512), --e2e (2000)."),
    size: str = typer.Option("500x375", help="--e2e: JPEG size WIDTHxHEIGHT."),
    encoder: Optional[str] = typer.Option(None, hidden=True, help="--e2e: another encoder than towers (tests)."),
    workdir: Optional[Path] = typer.Option(None, hidden=True, help="--e2e, --scale: keep the files here (tests)."),
    point: Optional[Path] = typer.Option(None, hidden=True, help="--e2e internal: measure one point (JSON spec)."),
    scale: bool = typer.Option(False, "--scale", help="Run-wide stages on synthetic files (--rows, --shards)."),
    rows: int = typer.Option(1_000_000, min=1, help="--scale: synthetic rows."),
    shards: int = typer.Option(100, min=1, help="--scale: shards the rows are spread over."),
    dim: int = typer.Option(8, min=1, help="--scale: embedding dimension (small keeps the files small)."),
) -> None:
    """Throughput, scaling and memory of every stage (decode, embed, fit, score+write) and the overhead ratio."""
    if point is not None:
        _bench_e2e_point(point)
        return
    if e2e:
        _bench_e2e(out, pairs, size, encoder, workdir, bool(append))
        return
    from bicro_clean.lab import bench_cli

    if scale:
        typer.echo(bench_cli.scale(rows, shards, dim, workdir, out))
    elif embed_only:
        typer.echo(bench_cli.embed_only(pairs or 512, data, out))
    else:
        typer.echo(bench_cli.suite(quick, tiny, data, out, append, "bicro-clean bench " + " ".join(sys.argv[2:])))


def _bench_e2e_point(point: Path) -> None:
    """One point of `bench --e2e`, in its own interpreter: the job exactly as `run` (or `embed`) builds and runs it."""
    from bicro_clean.lab.bench_e2e import measure

    spec = json.loads(point.read_text())
    if spec["kind"] == "run":
        cfg = build_config(None, _run_overrides(input=[spec["input"]], out=spec["output"], encoder=spec["encoder"]))
        result = measure("run", cfg, lambda: run_with_runner(cfg))
    else:
        from bicro_clean.pipeline.embed import embed_shards

        cfg = build_config(None, _embed_overrides([spec["input"]], spec["output"], spec["encoder"], None, None, None))
        result = measure("embed", cfg, lambda: embed_shards(cfg))
    point.with_suffix(".result.json").write_text(json.dumps(result))


def _bench_e2e(out: Path, pairs: Optional[int], size: str, encoder: Optional[str], workdir: Optional[Path],
               append: bool) -> None:
    from bicro_clean.lab import bench_e2e

    try:
        image_size = bench_e2e.parse_size(size)
    except ValueError as error:
        typer.echo(f"config error: --size: {error}", err=True)
        raise typer.Exit(2)
    result = bench_e2e.run_e2e(pairs or bench_e2e.DEFAULT_PAIRS, image_size, encoder, workdir=workdir)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps(result, indent=2))
    typer.echo(bench_e2e.markdown(result))
    if append:
        bench_e2e.append_to_doc(result, "bicro-clean bench " + " ".join(sys.argv[2:]))


@app.command("fetch")
def fetch_cmd(
    dataset: str = typer.Argument(..., help="Which dataset: flickr8k."),
    out: Path = typer.Option(..., help="Folder to write images/, captions.csv and splits.json into."),
    keep_archives: bool = typer.Option(False, "--keep-archives", help="Keep the downloaded zips in OUT/archives."),
    timeout: float = typer.Option(60.0, min=1.0, help="Seconds without data before a download gives up."),
    sources: Optional[Path] = typer.Option(None, hidden=True, help="JSON table of archives (name, url, digests) "
                                           "instead of the built-in mirror (tests, other mirrors)."),
) -> None:
    """Download a benchmark (needs internet), verify its checksums and convert it for `demo --data` / `evaluate`.

    flickr8k: Flickr8k_Dataset.zip + Flickr8k_text.zip from the jbrownlee/Datasets GitHub release (~1 GB)."""
    from bicro_clean.lab.fetch import FLICKR8K, FetchError, archives_from_json, fetch_flickr8k

    if dataset != "flickr8k":
        typer.echo(f"fetch error: unknown dataset {dataset!r} (known: flickr8k)", err=True)
        raise typer.Exit(2)
    try:
        archives = archives_from_json(sources) if sources else FLICKR8K
        counts = fetch_flickr8k(out, archives, keep_archives=keep_archives, timeout=timeout)
    except FetchError as error:
        typer.echo(f"fetch error: {error}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps({"out": str(out), **counts}))


@app.command("demo")
def demo_cmd(
    data: Optional[Path] = typer.Option(None, file_okay=False, help="A folder with images/ and captions.csv "
                                        "(e.g. from `bicro-clean fetch flickr8k`); default: generated scenes."),
    out: Path = typer.Option(Path("demo-out"), help="Where the data, shards and results go."),
    images: Optional[int] = typer.Option(None, min=2, help="Generated scenes (default 1000, 2 captions each), or "
                                         "images taken from --data (default 400)."),
    noise_rate: float = typer.Option(0.4, min=0.0, max=0.9, help="Injected caption noise."),
    seed: int = typer.Option(0, help="Seed of the generated scenes and of the noise draw."),
    encoder: Optional[str] = typer.Option(None, help="Default towers; tiny for a seconds-long smoke run."),
    runner: Optional[str] = typer.Option(None, help="Default local (Prefect threads); none = no Prefect."),
    epochs: Optional[int] = typer.Option(None, min=1, hidden=True, help="BiCro epochs (seconds-long tests)."),
) -> None:
    """Offline end to end: captioned scenes (drawn here, or --data) with injected noise -> the whole default
    pipeline -> how well it found the noise (pairs, noise injected and found, AUROC, kept precision, report)."""
    from bicro_clean.lab.demo import DemoError, format_summary, run_demo

    try:
        with stop_on_signals():
            summary = run_demo(out, run_with_runner, data=data, images=images, noise_rate=noise_rate, seed=seed,
                               overrides={"embed.encoder": encoder, "runner.kind": runner, "bicro.epochs": epochs})
    except ValidationError as error:
        typer.echo(format_validation_error(error), err=True)
        raise typer.Exit(2)
    except (DemoError, ValueError, FileNotFoundError) as error:  # bad --data: a missing image, an unreadable row
        typer.echo(f"demo error: {error}", err=True)
        raise typer.Exit(2)
    typer.echo(format_summary(summary))
