"""`bicro-clean bench --scale`: the run-wide stages at crawl scale, on synthetic files, each in its own process.

    bicro-clean bench --scale --rows 10000000 --shards 1000 [--dim 8] [--out scale.json] [--workdir DIR]

It writes synthetic embeddings and score files in the pipeline's own format (lab/bench_scale_data.py), then runs,
each in a fresh interpreter so that its peak RSS is its own:

    generate       the synthetic embeddings and score files (setup, not a pipeline stage)
    fit            pipeline.fit.fit_stage: the fit sample read from the embeddings, BiCro fitted (1 epoch)
    select         the run-wide values: the keep-fraction cutoff (keep_fraction 0.7) and keys repeated across shards
    write_outputs  every shard's annotated/filtered Parquet and completion marker, by the write stage's own
                   functions but without its tars (there are no input shards): a per-shard stage, run here one
                   shard after another
    finalize       pipeline.finalize.finalize_stage: keep_keys.parquet, keep_uids.npy, manifest
    report_plan    pipeline.report.report_plan: the manifest, the rule and every score column's range from the
                   annotated files' footers (single process, in the flow's process in a run)
    report_scan    pipeline.report.report_scan over REPORT_GROUPS groups of annotated files, one after another: the
                   report's per-row work, which a run maps over groups as tasks (distributed)
    report_merge   pipeline.report.write_report given the groups' partials: merged and written as report.html
                   (the single report task; thumbnails are missing: there are no input shards)

Per stage: wall `seconds`, `cpu_seconds` (user + system of the whole process, every thread), `peak_rss_mib`
(the process's high-water mark), `rss_after_imports_mib` (what the imports alone hold), `rows` and
`cpu_us_per_row`. Benchmarks print figures; they are never timed tests.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

STAGES = ("generate", "fit", "select", "write_outputs", "finalize", "report_plan", "report_scan", "report_merge")
REPORT_GROUPS = 16  # the groups a run with 4 workers maps the report's scan over (pipeline.shard_groups)
KEEP_FRACTION = 0.7


def _config(root: Path) -> Any:
    from bicro_clean.pipeline.config import CleanConfig

    return CleanConfig(input=str(root / "shards" / "*.tar"), output=str(root / "out"),
                       select={"keep_fraction": KEEP_FRACTION},
                       bicro={"epochs": 1, "fit_sample": _plan(root)["fit_sample"]},
                       embed={"encoder": "tiny", "progress": False})


def _plan(root: Path) -> dict[str, Any]:
    return json.loads((root / "plan.json").read_text())


def _shards(root: Path) -> list[str]:
    return [str(root / "shards" / f"{i:05d}.tar") for i in range(_plan(root)["shards"])]


def _embedded(root: Path) -> list[str]:
    from bicro_clean.pipeline.layout import embedding_path

    return [embedding_path(str(root / "out"), s) for s in _shards(root)]


def _generate(root: Path) -> dict[str, Any]:
    from bicro_clean.lab.bench_scale_data import shard_rows, write_embeddings, write_scores

    plan, config = _plan(root), _config(root)
    counts = shard_rows(plan["rows"], plan["shards"])
    for number, (shard, n) in enumerate(zip(_shards(root), counts)):
        write_embeddings(config, shard, number, n, plan["dim"], plan["seed"])
        write_scores(config, shard, number, n, plan["dim"], plan["seed"])
    return {"rows": plan["rows"]}


def _fit(root: Path) -> dict[str, Any]:
    from bicro_clean.pipeline.fit import fit_stage

    config = _config(root)
    (root / "checkpoint.txt").write_text(fit_stage(config, _embedded(root)))
    sample = config.bicro.fit_sample
    return {"rows": sample if 0 < sample < _plan(root)["rows"] else _plan(root)["rows"]}


def _select(root: Path) -> dict[str, Any]:
    from bicro_clean.pipeline import select
    from bicro_clean.pipeline.layout import scores_path

    config = _config(root)
    start = time.perf_counter()
    cutoff = select.global_cutoff([scores_path(config.output, s) for s in _shards(root)], config.select.column,
                                  KEEP_FRACTION)
    middle = time.perf_counter()
    duplicates = select.duplicate_keys(_embedded(root))
    end = time.perf_counter()
    (root / "run_wide.pkl").write_bytes(pickle.dumps(select.RunWide(cutoff, duplicates)))
    return {"rows": _plan(root)["rows"], "cutoff_seconds": round(middle - start, 2),
            "repeated_keys_seconds": round(end - middle, 2), "repeated_keys": len(duplicates),
            "cutoff": cutoff.as_dict()}


def _write_outputs(root: Path) -> dict[str, Any]:
    from bicro_clean.lab.bench_scale_data import write_outputs

    config, run_wide = _config(root), pickle.loads((root / "run_wide.pkl").read_bytes())
    kept = sum(write_outputs(config, shard, run_wide)["counts"]["kept"] for shard in _shards(root))
    return {"rows": _plan(root)["rows"], "kept": kept}


def _finalize(root: Path) -> dict[str, Any]:
    from bicro_clean.pipeline.finalize import finalize_stage
    from bicro_clean.pipeline.shards import shard_id

    manifest = finalize_stage(_config(root), [shard_id(s) for s in _shards(root)],
                              (root / "checkpoint.txt").read_text())
    (root / "manifest.txt").write_text(manifest)
    return {"rows": _plan(root)["rows"]}


def _report_plan(root: Path) -> dict[str, Any]:
    from bicro_clean.pipeline.report import report_plan

    plan = report_plan(_config(root), (root / "manifest.txt").read_text())
    (root / "report_plan.pkl").write_bytes(pickle.dumps(plan))
    return {"rows": _plan(root)["rows"], "files": len(plan[0])}


def _report_scan(root: Path) -> dict[str, Any]:
    from bicro_clean.pipeline.report import report_scan
    from bicro_clean.pipeline.shard_groups import split_even

    paths, setup = pickle.loads((root / "report_plan.pkl").read_bytes())
    partials = [report_scan(group, setup) for group in split_even(paths, REPORT_GROUPS)]
    blob = pickle.dumps(partials)
    (root / "report_partials.pkl").write_bytes(blob)
    return {"rows": _plan(root)["rows"], "groups": len(partials),
            "partial_kib": round(len(blob) / 1024 / max(len(partials), 1))}


def _report_merge(root: Path) -> dict[str, Any]:
    from bicro_clean.pipeline.report import write_report

    logging.getLogger("bicro_clean.pipeline.report.thumbnails").setLevel(logging.ERROR)  # no input shards
    _, setup = pickle.loads((root / "report_plan.pkl").read_bytes())
    partials = pickle.loads((root / "report_partials.pkl").read_bytes())
    write_report(_config(root), (root / "manifest.txt").read_text(), (setup, partials))
    return {"rows": _plan(root)["rows"]}


RUNNERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "generate": _generate, "fit": _fit, "select": _select, "write_outputs": _write_outputs,
    "finalize": _finalize, "report_plan": _report_plan, "report_scan": _report_scan, "report_merge": _report_merge}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(stage: str, root: Path) -> dict[str, Any]:
    """One stage in this process (a fresh interpreter started by `run_scale`): its figures."""
    import bicro_clean.pipeline.fit  # noqa: F401  the heavy imports (torch) before the baseline
    import bicro_clean.pipeline.report  # noqa: F401

    baseline, cpu0, start = _rss_mib(), _cpu(), time.perf_counter()
    extra = RUNNERS[stage](root)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu0
    rows = int(extra.pop("rows"))
    return {"stage": stage, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_mib": round(_rss_mib(), 1), "rss_after_imports_mib": round(baseline, 1), "rows": rows,
            "cpu_us_per_row": round(cpu / max(rows, 1) * 1e6, 3), **extra}


def run_scale(rows: int, shards: int, dim: int = 8, workdir: Path | None = None, seed: int = 0,
              fit_sample: int = 32_768, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Every stage on `rows` synthetic rows in `shards` shards, each stage in its own process."""
    from bicro_clean.lab.machine import machine_info

    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="bicro-scale-")) if own else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps({"rows": rows, "shards": shards, "dim": dim, "seed": seed,
                                                    "fit_sample": fit_sample}))
    results = []
    try:
        for stage in stages:
            logger.info("bench --scale: %s (%d rows, %d shards)", stage, rows, shards)
            done = subprocess.run([sys.executable, "-m", "bicro_clean.lab.bench_scale", "--child", stage,
                                   "--workdir", str(root)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode != 0:
                raise RuntimeError(f"bench --scale: stage {stage} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            logger.info("bench --scale: %s", results[-1])
        disk = sum(f.stat().st_size for f in (root / "out").rglob("*") if f.is_file())
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "scale", "rows": rows, "shards": shards, "dim": dim, "fit_sample": fit_sample,
            "machine": machine_info(),
            "output_bytes": disk, "stages": results}


def markdown(result: dict[str, Any]) -> str:
    head = (f"{result['rows']:,} rows in {result['shards']:,} shards (dim {result['dim']})\n\n"
            "| stage | seconds | CPU seconds | CPU µs/row | peak RSS MiB | RSS after imports MiB |\n"
            "|---|---|---|---|---|---|\n")
    return head + "\n".join(f"| {s['stage']} | {s['seconds']} | {s['cpu_seconds']} | {s['cpu_us_per_row']} | "
                            f"{s['peak_rss_mib']} | {s['rss_after_imports_mib']} |" for s in result["stages"])


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run-wide stages at scale on synthetic files")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--fit-sample", type=int, default=32_768)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=STAGES)
    args = parser.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_child(args.child, args.workdir)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_scale(args.rows, args.shards, args.dim, args.workdir, fit_sample=args.fit_sample)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
