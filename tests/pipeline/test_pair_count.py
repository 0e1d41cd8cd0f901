"""The embed bar's total: pairs counted from tar indexes (the reader's row count), estimated where there is no
cheap index, and corrected shard by shard so that it ends at the rows actually embedded."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
from pathlib import Path

import pytest

from conftest import tar_bytes
from bicro_clean.pipeline import progress
from bicro_clean.pipeline.config import ReaderConfig
from bicro_clean.pipeline.pair_count import PairPlan, tar_pairs
from bicro_clean.pipeline.tar_reader import iter_shard


def _rows(path: Path) -> int:
    return sum(1 for _ in iter_shard(str(path), ReaderConfig()))


def _pax_tar(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    return buffer.getvalue()


def test_a_plain_tar_is_counted_from_its_headers_as_the_reader_groups_it(tmp_path, tiny_shards):
    long = "d" * 120 + "/"  # past the 100-byte name field: a GNU long name, or a PAX path
    cases = {
        "gnu.tar": tar_bytes([(f"{long}{i:03d}.{ext}", b"x" * 700) for i in range(5) for ext in ("jpg", "txt", "json")]),
        "pax.tar": _pax_tar([f"{long}{i:03d}.{ext}" for i in range(4) for ext in ("png", "txt")]),
        "repeated.tar": tar_bytes([("a.jpg", b"1"), ("a.txt", b"2"), ("b.jpg", b"3"), ("a.txt", b"4")]),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for path in [*map(tmp_path.joinpath, cases), *sorted(tiny_shards.glob("*.tar"))]:
        assert tar_pairs(str(path)) == _rows(path), path.name
    assert [tar_pairs(str(tmp_path / n)) for n in cases] == [5, 4, 3]


def test_no_count_where_there_is_no_cheap_index(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(tar_bytes([("a.jpg", b"1"), ("a.txt", b"2")])))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    assert tar_pairs(str(tmp_path / "a.tar.gz")) is None  # compressed: no headers to seek to
    assert tar_pairs(str(tmp_path / "junk.tar")) is None
    assert tar_pairs(str(tmp_path / "gone.tar")) is None
    assert tar_pairs("pipe:cat x.tar") is None and tar_pairs("https://example.invalid/00000.tar") is None


def test_the_plan_corrects_counts_estimates_and_cached_shards():
    plan = PairPlan(["a", "b", "c", "d"])
    assert plan.count("a", 10) == 40  # 10 counted, and 10 each estimated for the three not counted
    assert plan.count("b", 20) == 20 and plan.total == 60  # 10 + 20 + 2 x 15
    assert plan.finish("c", 14, cached=False) + plan.finish("a", 10, cached=True) == -12  # a leaves: no work now
    assert plan.finish("d", 16, cached=False) + plan.finish("b", 21, cached=False) == 3
    assert plan.total == 14 + 16 + 21 and not plan.unknown and not plan.added
    assert plan.finish("b", 21, cached=False) == 0  # a group run again reports its shards again: no change


class _Sink:
    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int, int]] = []

    def report(self, stage, advance, total, items) -> None:
        self.reports.append((stage, advance, total, items))

    def stage_done(self, stage, seconds, tally=None) -> None:
        pass


def test_the_total_ends_at_the_rows_embedded_damaged_and_compressed_shards_included(tmp_path, tiny_shards):
    """Counted shards, a compressed one (estimated) and one cut short (its headers say more than the reader
    gets): the total the display was told ends at the rows, and relayed reports arrive as made here."""
    good = sorted(tiny_shards.glob("*.tar"))
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(good[0].read_bytes()))
    data = good[1].read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    shards = [str(p) for p in good] + [str(tmp_path / "z.tar.gz"), str(tmp_path / "cut.tar")]
    sink = _Sink()
    previous = progress.install(sink)
    try:
        progress.plan_pairs("embed", shards)
        deadline = time.monotonic() + 10  # the count runs in the background: milliseconds here
        while progress._plans["embed"].unknown != {shards[-2]} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert progress._plans["embed"].unknown == {shards[-2]}  # only the compressed shard is estimated
        for shard in shards:
            rows = _rows(Path(shard))
            progress.replay(("report", ("embed", rows, 0, 0)))  # as a Dask worker's relay delivers them
            progress.replay(("finish", ("embed", shard, rows, False)))
        progress.stage_done("embed", 1.0)
    finally:
        progress.install(previous)
    rows = sum(_rows(Path(s)) for s in shards)
    assert sum(r[2] for r in sink.reports) == rows == sum(r[1] for r in sink.reports)
    assert sum(r[3] for r in sink.reports) == len(shards)  # shards done


def test_reports_go_nowhere_without_a_sink():
    assert not progress.active()
    progress.plan_pairs("embed", ["a.tar"])
    progress.finish("embed", "a.tar", 3)
    assert "embed" not in progress._plans


@pytest.mark.parametrize("stage,speed,text", [("embed", 1234.4, "1,234 pairs/s"), ("score", 2.5, "2.5 shards/s"),
                                              ("fit", 0.25, "4.0 s/epoch"), ("embed", None, "")])
def test_rate_text(stage, speed, text):
    from bicro_clean.progress_columns import count_text, rate_text

    assert rate_text(stage, speed) == text
    assert count_text(1234, 5000) == "1,234/5,000" and count_text(7, None) == "7"


def test_a_large_crawl_has_an_even_sample_of_its_shards_counted():
    from bicro_clean.pipeline.pair_count import to_count

    shards = [f"{i:05d}.tar" for i in range(1000)]
    assert to_count(shards[:10], limit=16) == shards[:10]
    sample = to_count(shards, limit=16)
    assert len(sample) == 16 and sample[0] == shards[0] and sample[-1] == "00937.tar" and sample == sorted(sample)
