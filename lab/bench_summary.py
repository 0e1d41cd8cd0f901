"""The bench suite's summary: headline keys (best rates, fit seconds per epoch, peak RSS per stage), the overhead
ratio (fit + score + write) / embed with how each term was got, and the Markdown table appended to
docs/benchmarks.md."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from bicro_clean.lab.bench_plan import VIT, Plan
from bicro_clean.lab.output import BENCH_DOC, append_section

logger = logging.getLogger(__name__)


def summarise(result: dict[str, Any], plan: Plan) -> None:
    """The headline keys: best rates per setting, fit seconds per epoch, peak RSS per stage, overhead ratios."""
    # the best rate of any batch size and worker count: the overhead ratio is then never flattered by a slow
    # embed setting (on 2 cores, 0 decode workers beat 2: the workers take the model's cores)
    embed_rates: dict[str, float] = {}
    for group in result["embed"]:
        for r in group["runs"]:
            key = f"{r['encoder']}|{r['device']}|{r['precision']}"
            embed_rates[key] = max(embed_rates.get(key, 0.0), r["pairs_per_s"])
    result["embed_pairs_per_s"] = embed_rates
    result["decode_samples_per_s"] = {f"{r['source']}|workers={r['workers']}": r["samples_per_s"]
                                      for r in result["decode"]["runs"]}
    result["fit_seconds_per_epoch"] = {
        f"{f['pairs']}|{f['index']}": {"warmup": f["warmup_epoch_s"], "cotrain": f["cotrain_epoch_s"]}
        for f in result["fit"]}
    # linear in pairs <=> the same microseconds per pair at every size
    result["fit_us_per_pair"] = {
        str(f["pairs"]): {"warmup": round(f["warmup_epoch_s"] / f["pairs"] * 1e6, 1),
                          "cotrain": round(f["cotrain_epoch_s"] / f["pairs"] * 1e6, 1)} for f in result["fit"]}
    result["score_pairs_per_s"] = {
        f"{p['kind']}|{p['index']}|{p['anchors']}" + (f"|{p['shards']}x{p['shard_pairs']}" if p["kind"] == "path"
                                                      else ""): p["pairs_per_s"]
        for p in result["score"]["points"]}
    result["peak_rss_mb"] = {
        "decode": result["decode"]["peak_rss_mb"],
        "embed": max((g.get("peak_rss_mb", 0) for g in result["embed"]), default=0),
        "fit": {f"{f['pairs']}|{f['index']}": f["peak_rss_mb"] for f in result["fit"]},
        "score": {k: p["peak_rss_mb"] for k, p in zip(result["score_pairs_per_s"], result["score"]["points"])},
    }
    result["overhead_ratio_detail"] = overhead(result, plan, embed_rates)
    primary = _primary(result["overhead_ratio_detail"], plan)
    result["overhead_ratio"] = result["overhead_ratio_detail"][primary]["ratio"] if primary else None
    result["overhead_ratio_setting"] = primary


def _primary(detail: dict[str, Any], plan: Plan) -> str | None:
    """The headline setting: ViT-B-32 on the GPU when there is one, else towers on the CPU."""
    wanted = [f"{VIT}|cuda|bf16-autocast", "towers|cpu|fp32", "tiny|cpu|fp32"]
    for key in wanted:
        if key in detail:
            return key
    return next(iter(detail), None)


def resolved_search(kind: str, anchors: int, device: str) -> str:
    """The anchor search a bank of `anchors` distinct rows gets under `bicro.anchor_index` = kind."""
    from bicro_clean.models.anchors import use_ivf

    return "ivf" if use_ivf(kind, anchors, "torch" if device == "cuda" else "faiss") else "flat"


def overhead(result: dict[str, Any], plan: Plan, embed_rates: dict[str, float]) -> dict[str, Any]:
    """(fit + score + write) / embed for plan.overhead_pairs input pairs with the default configuration, per
    embed setting, with how each term was got.

    The default fits on `bicro.fit_sample` pairs (all of them when the input is smaller), so the fit term is the
    measured fit at that size; scoring and writing cover every input pair, with the anchors such a fit can have.
    """
    n, epochs = plan.overhead_pairs, 8  # BiCroParams' default recipe: 1 warm-up + 7 co-training epochs
    fit_pairs = plan.overhead_fit_pairs
    fits = {f["pairs"]: f for f in result["fit"]}
    size = min(fits, key=lambda s: abs(s - fit_pairs))
    fit = fits[size]
    fit_s = (fit["warmup_epoch_s"] + (epochs - 1) * fit["cotrain_epoch_s"]) * fit_pairs / size
    # score + write: the per-shard path with the smallest measured bank that holds every anchor of that fit
    paths = [p for p in result["score"]["points"] if p["kind"] == "path"
             and resolved_search(p["index"], p["anchors"], plan.device)
             == resolved_search("auto", p["anchors"], plan.device)]
    enough = [p["anchors"] for p in paths if p["anchors"] >= fit_pairs]
    top = min(enough) if enough else max(p["anchors"] for p in paths)
    path_rate = min(p["pairs_per_s"] for p in paths if p["anchors"] == top)
    score_s = n / path_rate
    search = resolved_search("auto", top, plan.device)
    out = {}
    for key, rate in embed_rates.items():
        embed_s = n / rate
        # terms to the millisecond: the tiny test run's terms are ~2 s, where 0.1 s rounding moved the ratio 2%
        out[key] = {"ratio": round((fit_s + score_s) / embed_s, 4), "embed_s": round(embed_s, 3),
                    "fit_s": round(fit_s, 3), "score_write_s": round(score_s, 3), "index": search,
                    "fit_pairs": fit_pairs,
                    "how": (f"embed: {n:,} pairs at the measured {rate} pairs/s (extrapolated); fit: the default "
                            f"bicro.fit_sample = {plan.fit_sample:,} pairs, measured warm-up + {epochs - 1} x "
                            f"co-training epoch at {size:,} pairs"
                            f"{'' if size == fit_pairs else f', scaled by {fit_pairs / size:g}'}; score+write: "
                            f"{n:,} pairs at the slowest measured per-shard rate with {top:,} anchors "
                            f"({search} search, {path_rate} pairs/s)")}
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    lines = [f"Machine: {m['cpu']}, {m['cpu_cores']} cores{gpu}; Python {m['python']}, torch {m['torch']}, "
             f"faiss {m['faiss']}; 1-min load at start {m['load_avg_1m']}. Total {result['total_s']} s.", "",
             "| stage | setting | figure | peak RSS MiB |", "|---|---|---|---|"]
    for r in result["decode"]["runs"]:
        lines.append(f"| read+decode | {r['source']}, {r['workers']} workers | {r['samples_per_s']:,} samples/s | "
                     f"{result['decode']['peak_rss_mb']:,.0f} |")
    for g in result["embed"]:
        if g.get("skipped"):
            lines.append(f"| embed | {g['encoder']} {g['device']} | skipped: {g['skipped'][:80]} | |")
        for r in g["runs"]:
            share = (f"; {r['share_waiting_for_decode']:.0%} decode, {r['share_image_model']:.0%} image, "
                     f"{r['share_text_model']:.0%} text" if r["workers"] == 0 else "")
            lines.append(f"| embed | {r['encoder']} {r['device']} {r['precision']}, batch {r['batch_size']}, "
                         f"{r['workers']} workers | {r['pairs_per_s']:,} pairs/s{share} | {g['peak_rss_mb']:,.0f} |")
    for f in result["fit"]:
        per_pair = result["fit_us_per_pair"][str(f["pairs"])]["cotrain"]
        gpu_mem = f", GPU peak {f['cuda_peak_mb']:,.0f} MiB" if f.get("cuda_peak_mb") else ""
        lines.append(f"| fit | {f['pairs']:,} pairs, {f['device']}, batch {f['batch_size']}, {f['index']} | "
                     f"warm-up epoch {f['warmup_epoch_s']} s, co-training epoch {f['cotrain_epoch_s']} s "
                     f"({per_pair:,.0f} us per pair){gpu_mem} | "
                     f"{f['peak_rss_mb']:,.0f} |")
    for p in result["score"]["points"]:
        what = ("BiCroModel.score" if p["kind"] == "score" else
                f"score_shard+decide+write {p['shards']} x {p['shard_pairs']}")
        build = f" (index build {p['index_build_s']} s)" if "index_build_s" in p else ""
        search = p["index"] if p["index"] != "auto" else f"auto = {resolved_search('auto', p['anchors'], p['device'])}"
        lines.append(f"| score | {what}, {search}, {p['anchors']:,} anchors, {p['device']} | "
                     f"{p['pairs_per_s']:,} pairs/s{build} | {p['peak_rss_mb']:,.0f} |")
    for key, o in result["overhead_ratio_detail"].items():
        lines.append(f"| overhead ratio | {key}, {o['index']} | {o['ratio']} = ({o['fit_s']:.1f} s fit + "
                     f"{o['score_write_s']:.1f} s score+write) / {o['embed_s']:.1f} s embed | |")
    return "\n".join(lines)


def append_to_doc(result: dict[str, Any], command: str, path: Path = BENCH_DOC) -> None:
    """Append (never rewrite: the file holds earlier runs) this run's table under its command."""
    how = result["overhead_ratio_detail"].get(result["overhead_ratio_setting"], {}).get("how", "")
    section = (f"\n## `bicro-clean bench` ({time.strftime('%Y-%m-%d')})\n\nCommand: `{command}`\n\n"
               f"{markdown(result)}\n\nOverhead ratio: {how}.\n")
    append_section(section, path)
