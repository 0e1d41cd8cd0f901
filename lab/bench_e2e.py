"""`bicro-clean bench --e2e`: the whole cleaning job with default settings, measured, against the embed stage alone.

    bicro-clean bench --e2e [--pairs 2000] [--size 500x375] [--out e2e.json] [--append]

Makes synthetic photo-like JPEG shards (lab.synthetic.write_shards: one caption per picture, 1,000 pairs per shard,
10% mismatched captions with their truth in KEY.json), then measures two points, each `bicro-clean bench --point`
in a fresh interpreter (so its memory is its own), where the CLI builds the config and hands its own function to
`measure` (the lab never imports the CLI):
  run:   the job as `bicro-clean run` does it (cli.build_config + cli.run_with_runner: the default runner, the
         default `towers` encoder and every default setting) into one temp folder; the per-stage wall seconds
         come from the run's own summary (`stage_seconds`, timed in pipeline.run.run_stages);
  embed: what `bicro-clean embed` does on the same shards (cli.build_config + pipeline.embed.embed_shards) into
         another temp folder.
Both are timed inside their interpreter from the config to the last output (encoder loading, the Prefect API's
start and every stage included; interpreter start-up and imports not: `wall_with_startup_s` has them). The ratio
is the two measured times, nothing extrapolated. Peak RSS is each interpreter's own VmHWM (lab.machine.peak_rss_mib)
and the largest of its child processes' (decode workers, Prefect's API server); on CUDA, the peak memory torch
allocated in that interpreter (with the default thread runner every stage runs there).
Benchmarks print figures; they are never timed tests.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bicro_clean.lab.machine import machine_info
from bicro_clean.lab.output import append_section
from bicro_clean.lab.synthetic import PHOTO_SIZE, ShardSpec, write_shards

logger = logging.getLogger(__name__)

DEFAULT_PAIRS = 2000
SHARD_PAIRS = 1000
NOISE_RATE = 0.1


def parse_size(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if width < 8 or height < 8:
        raise ValueError(f"size must be at least 8x8, got {text!r}")
    return width, height


# ------------------------------------------------------------------------- in the child interpreter


def measure(kind: str, config: Any, work: Callable[[], Any]) -> dict[str, Any]:
    """Time and measure `work()` (the CLI's own: `run_with_runner(config)` or `embed_shards(config)`, handed in by
    `bicro-clean bench --point`, so the lab never imports the CLI)."""
    import torch

    from bicro_clean.lab.machine import ChildPeaks, peak_rss_mib

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with ChildPeaks() as children:
        done = work()
    result: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 2)}
    if kind == "run":
        result.update({k: done[k] for k in ("stage_seconds", "total_seconds", "in", "kept", "dropped", "errors",
                                            "shards")})
        result["runner"] = config.runner.kind
    else:
        result.update({"in": sum(r.samples for r in done), "errors": sum(r.errors for r in done),
                       "shards": len(done)})
    result["encoder"] = config.embed.encoder
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["largest_child_rss_mib"] = round(children.peak_mib, 1)
    result["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    result["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    return result


# ------------------------------------------------------------------------------------- the parent


def _spawn(kind: str, spec: dict[str, Any], point: Path) -> dict[str, Any]:
    """One measured point in a fresh interpreter running the CLI: `bicro-clean bench --point POINT.json`."""
    point.write_text(json.dumps({"kind": kind, **spec}))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from bicro_clean.cli import main; main()", "bench", "--point",
                           str(point)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench --e2e {kind} failed:\n{done.stderr[-4000:]}")
    result = json.loads(point.with_suffix(".result.json").read_text())
    result["wall_with_startup_s"] = round(time.perf_counter() - start, 2)
    logger.info("bench --e2e %s: %.1fs", kind, result["seconds"])
    return result


def _rate(pairs: int, seconds: float | None) -> float | None:
    return round(pairs / seconds, 1) if seconds else None


def _outputs(root: Path) -> dict[str, Any]:
    """What the run left: the files every run writes (checked here, before a temp folder goes)."""
    return {"manifest": (root / "manifest.json").is_file(), "report": (root / "report.html").is_file(),
            "keep_keys": (root / "keep_keys.parquet").is_file(),
            "annotated_files": len(list((root / "annotated").glob("*.parquet"))),
            "filtered_files": len(list((root / "filtered").glob("*.parquet"))),
            "cleaned_tars": len(list((root / "shards").glob("*.tar")))}


def run_e2e(pairs: int = DEFAULT_PAIRS, size: tuple[int, int] = PHOTO_SIZE, encoder: str | None = None,
            shard_pairs: int = SHARD_PAIRS, noise_rate: float = NOISE_RATE,
            workdir: Path | None = None) -> dict[str, Any]:
    """The benchmark's JSON. `encoder` overrides the default towers (tests: `tiny`); `workdir` keeps the shards
    and both outputs there instead of in a temp folder that is removed."""
    with tempfile.TemporaryDirectory(prefix="bicro-e2e-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        start = time.perf_counter()
        paths = write_shards(root / "shards", ShardSpec(pairs, shard_pairs, image_size=size, noise_rate=noise_rate,
                                                        truth=True))
        make_s = round(time.perf_counter() - start, 2)
        spec = {"input": str(root / "shards" / "*.tar"), "encoder": encoder}
        run = _spawn("run", {**spec, "output": str(root / "run")}, root / "run-point.json")
        run["outputs"] = _outputs(root / "run")
        embed = _spawn("embed", {**spec, "output": str(root / "embed")}, root / "embed-point.json")
    run["outside_stages_s"] = round(run["seconds"] - run["total_seconds"], 2)  # Prefect's API start, flow setup
    run["pairs_per_s"] = _rate(pairs, run["seconds"])
    run["stage_pairs_per_s"] = {stage: _rate(pairs, s) for stage, s in run["stage_seconds"].items()}
    embed["pairs_per_s"] = _rate(pairs, embed["seconds"])
    gpu = run["device"] != "cpu"
    return {
        "benchmark": "e2e", "machine": machine_info(),
        "data": {"pairs": pairs, "shards": len(paths), "shard_pairs": shard_pairs, "image_size": list(size),
                 "noise_rate": noise_rate, "source": "synthetic photo-like JPEGs (lab.synthetic)",
                 "make_shards_s": make_s},
        "settings": {"encoder": run["encoder"], "runner": run["runner"], "other": "every CleanConfig default"},
        "device": run["device"],
        "run": run, "embed_alone": embed,
        "stage_seconds": run["stage_seconds"],
        "pairs_per_s": run["pairs_per_s"],
        "stage_pairs_per_s": run["stage_pairs_per_s"],
        "peak_rss_mib": {"run": run["peak_rss_mib"], "embed_alone": embed["peak_rss_mib"]},
        "gpu_peak_mib": {"run": run["gpu_peak_mib"], "embed_alone": embed["gpu_peak_mib"]} if gpu else None,
        "ratio_run_to_embed": round(run["seconds"] / embed["seconds"], 3),
        "ratio_how": "measured: seconds of the whole run / seconds of `bicro-clean embed` alone on the same shards, "
                     "each timed in its own interpreter from the config to the last output (encoder load included, "
                     "interpreter start-up not)",
    }


def markdown(result: dict[str, Any]) -> str:
    run, embed, data = result["run"], result["embed_alone"], result["data"]
    lines = ["| what | seconds | pairs/s |", "|---|---|---|",
             f"| whole run ({result['settings']['runner']} runner) | {run['seconds']} | {run['pairs_per_s']} |"]
    lines += [f"| - {stage} | {s} | {result['stage_pairs_per_s'][stage]} |"
              for stage, s in result["stage_seconds"].items()]
    lines += [f"| embed alone | {embed['seconds']} | {embed['pairs_per_s']} |",
              f"| **run / embed alone** | **{result['ratio_run_to_embed']}** | |"]
    memory = f"peak RSS run {run['peak_rss_mib']} MiB, embed alone {embed['peak_rss_mib']} MiB"
    if result["gpu_peak_mib"]:
        memory += f"; GPU peak run {run['gpu_peak_mib']} MiB, embed alone {embed['gpu_peak_mib']} MiB"
    head = (f"{data['pairs']} pairs, {data['shards']} shard(s), {data['image_size'][0]}x{data['image_size'][1]} "
            f"JPEG, encoder {result['settings']['encoder']}, device {result['device']}; {memory}.")
    return head + "\n\n" + "\n".join(lines)


def append_to_doc(result: dict[str, Any], command: str) -> None:
    """Append (never rewrite) this run's section to docs/benchmarks.md."""
    machine = result["machine"]
    section = (f"\n## `bicro-clean bench --e2e` ({time.strftime('%Y-%m-%d')})\n\nCommand: `{command}`\n\n"
               f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, {machine.get('gpu', 'no GPU')}.\n\n"
               f"{markdown(result)}\n\nRatio: {result['ratio_how']}.\n")
    append_section(section)
