"""The lab's shared pieces: the one synthetic-shard maker (what each benchmark asks of it), the one AUROC and the
one peak-RSS reading (VmHWM, its own process's, read in the child as the benchmarks do)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from bicro_clean.lab.machine import ChildPeaks, machine_info, peak_rss_mib
from bicro_clean.lab.metrics import auroc
from bicro_clean.lab.synthetic import ShardSpec, write_shards
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.decode import decode_sample
from bicro_clean.pipeline.shards import RawSample
from bicro_clean.pipeline.tar_reader import iter_shard


def _samples(paths) -> list:
    samples = [s for p in paths for s in iter_shard(str(p), ReaderConfig())]
    assert all(isinstance(s, RawSample) for s in samples), [s for s in samples if not isinstance(s, RawSample)]
    return samples


def test_pool_with_distinct_bytes_noise_and_truth(tmp_path):
    """The load test's shards: a small picture pool, every pair's bytes distinct, mismatched captions with truth."""
    spec = ShardSpec(pairs=250, shard_pairs=100, image_size=(32, 24), pictures=8, distinct_bytes=True,
                     noise_rate=0.3, truth=True, quality=85, seed=1)
    seen = []
    paths = write_shards(tmp_path, spec, on_shard=seen.append)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [len(s.keys) for s in seen] == [100, 100, 50] and [s.path for s in seen] == paths
    samples = _samples(paths)
    assert len(samples) == 250 and len({s.key for s in samples}) == 250
    assert [s.key for s in samples] == [k for s in seen for k in s.keys]
    assert len({hashlib.sha256(s.members["jpg"]).digest() for s in samples}) == 250  # 8 pictures, 250 byte strings
    truth = [json.loads(s.members["json"])["truth_clean"] for s in samples]
    assert truth == [c for s in seen for c in s.clean]
    assert 0.15 < 1 - np.mean(truth) < 0.45
    captions = [s.members["txt"].decode() for s in samples]
    assert len(set(captions)) == 250 and captions == [c for s in seen for c in s.captions]
    for raw in samples[:5]:
        decoded = decode_sample(raw, ReaderConfig())
        assert (decoded.width, decoded.height) == (32, 24)


def test_defaults_give_a_picture_per_pair_and_true_captions(tmp_path):
    """The decode/embed benchmarks' shards: a distinct photo-like picture per pair, no KEY.json, no noise."""
    paths = write_shards(tmp_path, ShardSpec(pairs=6, shard_pairs=4, image_size=(40, 30)))
    samples = _samples(paths)
    assert len(samples) == 6 and all(set(s.members) == {"jpg", "txt"} for s in samples)
    assert len({s.members["jpg"] for s in samples}) == 6
    same = write_shards(tmp_path / "again", ShardSpec(pairs=6, shard_pairs=4, image_size=(40, 30)))
    assert [p.read_bytes() for p in same] == [p.read_bytes() for p in paths]  # deterministic


def test_one_picture_for_every_pair(tmp_path):
    """bench_score's shards: the same small JPEG everywhere (the path is measured, not decoding)."""
    samples = _samples(write_shards(tmp_path, ShardSpec(pairs=5, shard_pairs=5, image_size=(16, 16), pictures=1,
                                                        noise_rate=0.5)))
    assert len({s.members["jpg"] for s in samples}) == 1
    assert all(s.members["txt"].decode().endswith(f"number {i}") for i, s in enumerate(samples))


def test_auroc():
    clean = np.array([True, True, True, False, False])
    assert auroc(np.array([0.9, 0.8, 0.4, 0.6, 0.1]), clean) == pytest.approx(5 / 6)
    assert math.isnan(auroc(np.array([0.2, 0.3]), np.array([True, True])))  # one class: nothing to rank


def test_peak_rss_is_the_process_own_high_water_mark():
    assert peak_rss_mib() > 10
    # A child started by a parent holding more memory reports its own, smaller peak (ru_maxrss would not).
    ballast = np.ones(300 * 2**20 // 8)  # noqa: F841 - held while the child runs
    code = "from bicro_clean.lab.machine import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < peak_rss_mib() - 200
    assert {"cpu", "cpu_cores", "cpu_threads", "python", "torch", "faiss", "load_avg_1m", "cuda"} <= set(machine_info())


def test_child_peaks_reads_a_childs_vmhwm_while_it_lives():
    code = "import time; b = bytearray(200 * 2**20); time.sleep(1.0)"
    with ChildPeaks(period=0.05) as peaks:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert peaks.peak_mib >= 200
