"""`bicro-clean fetch flickr8k`: against small generated Flickr8k-shaped archives on a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from bicro_clean.lab.fetch import FLICKR8K, Archive, FetchError, fetch_flickr8k
from bicro_clean.pipeline.make_shards import read_caption_rows
from PIL import Image
from typer.testing import CliRunner

from bicro_clean.cli import app

PHOTOS = ["1000_a.jpg", "1001_b.jpg", "1002_c.jpg"]


def _jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (shade, 40, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _archives() -> dict[str, bytes]:
    """The two Flickr8k zips in miniature, laid out as the real ones (sic 'Flicker8k_Dataset', macOS junk, a
    captioned name without a photo, a photo without captions)."""
    photos = {f"Flicker8k_Dataset/{name}": _jpeg(60 * i) for i, name in enumerate(PHOTOS)}
    photos["__MACOSX/Flicker8k_Dataset/._1000_a.jpg"] = b"junk"
    photos["Flicker8k_Dataset/9999_uncaptioned.jpg"] = _jpeg(7)
    tokens = [f"{name}#{i}\t{name[5]} caption number {i}, with a comma ." for name in PHOTOS for i in range(5)]
    tokens.append("2258277193_586949ec62.jpg.1#0\tA caption whose photo is not in the archive .")
    text = {"Flickr8k.token.txt": "\n".join(tokens).encode(), "Flickr_8k.trainImages.txt": b"1000_a.jpg\n1001_b.jpg\n",
            "Flickr_8k.devImages.txt": b"", "Flickr_8k.testImages.txt": b"1002_c.jpg\n"}
    return {"Flickr8k_Dataset.zip": _zip(photos), "Flickr8k_text.zip": _zip(text)}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A loopback HTTP server over a folder with the two archives: (base URL, their bytes)."""
    folder = tmp_path / "www"
    folder.mkdir()
    archives = _archives()
    for name, data in archives.items():
        (folder / name).write_bytes(data)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", archives
    finally:
        server.shutdown()
        server.server_close()


def _table(base: str, archives: dict[str, bytes], wrong: str | None = None) -> list[dict]:
    return [{"name": name, "url": f"{base}/{name}",
             "digests": {"sha256": hashlib.sha256(data + (b"x" if name == wrong else b"")).hexdigest()}}
            for name, data in archives.items()]


def _sources(tmp_path: Path, table: list[dict]) -> Path:
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(table))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script in a child: the real stderr, so 'one line, no traceback' is what users see."""
    script = Path(sys.executable).with_name("bicro-clean")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without the progress log lines (`... INFO bicro_clean...`): what is left must be the one error line."""
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if " INFO " not in line]


def test_fetch_converts_to_the_data_layout(served, tmp_path: Path) -> None:
    base, archives = served
    out = tmp_path / "flickr8k"
    result = CliRunner().invoke(app, ["fetch", "flickr8k", "--out", str(out),
                                      "--sources", str(_sources(tmp_path, _table(base, archives)))])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["images"] == 3 and counts["captions"] == 15
    assert sorted(p.name for p in (out / "images").iterdir()) == PHOTOS  # no junk, no uncaptioned photo
    with zipfile.ZipFile(io.BytesIO(archives["Flickr8k_Dataset.zip"])) as z:
        assert (out / "images" / "1001_b.jpg").read_bytes() == z.read("Flicker8k_Dataset/1001_b.jpg")
    rows = read_caption_rows(out / "captions.csv")  # what make-shards and demo --data read
    assert [(r.image, r.caption) for r in rows[:2]] == [("1000_a.jpg", "a caption number 0, with a comma ."),
                                                        ("1000_a.jpg", "a caption number 1, with a comma .")]
    assert json.loads((out / "splits.json").read_text()) == {"train": ["1000_a.jpg", "1001_b.jpg"], "dev": [],
                                                             "test": ["1002_c.jpg"]}
    assert not (out / "archives").exists()  # deleted once converted


def test_verified_archives_are_reused_without_the_network(served, tmp_path: Path) -> None:
    base, archives = served
    table = tuple(Archive(a["name"], a["url"], a["digests"]) for a in _table(base, archives))
    fetch_flickr8k(tmp_path / "f", table, keep_archives=True)
    offline = tuple(Archive(a.name, "http://127.0.0.1:9/nowhere", a.digests) for a in table)
    assert fetch_flickr8k(tmp_path / "f", offline)["captions"] == 15


def test_checksum_mismatch_refuses_in_one_line(served, tmp_path: Path) -> None:
    base, archives = served
    out = tmp_path / "flickr8k"
    sources = _sources(tmp_path, _table(base, archives, wrong="Flickr8k_text.zip"))
    result = _cli("fetch", "flickr8k", "--out", str(out), "--sources", str(sources))
    assert result.returncode == 2
    assert _error_lines(result) == [_error_lines(result)[0]]
    assert _error_lines(result)[0].startswith("fetch error: Flickr8k_text.zip: sha256 mismatch")
    assert not (out / "images").exists() and not (out / "captions.csv").exists()
    assert not list((out / "archives").glob("Flickr8k_text.zip*"))  # the bad download is not kept


def test_unreachable_url_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    table = [{"name": n, "url": f"http://127.0.0.1:{port}/{n}", "digests": {"sha256": "0" * 64}}
             for n in ("Flickr8k_Dataset.zip", "Flickr8k_text.zip")]
    result = _cli("fetch", "flickr8k", "--out", str(tmp_path / "o"), "--sources", str(_sources(tmp_path, table)),
                  "--timeout", "5")
    assert result.returncode == 2
    assert len(_error_lines(result)) == 1
    assert "cannot download" in result.stderr and str(port) in result.stderr


def test_unknown_dataset_and_missing_checksum(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["fetch", "coco", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown dataset" in result.output
    (tmp_path / "x.zip").write_bytes(b"data")
    with pytest.raises(FetchError, match="no checksum"):
        from bicro_clean.lab.fetch import download

        download(Archive("x.zip", "http://127.0.0.1:9/x.zip", {}), tmp_path)


def test_builtin_table_names_the_public_mirror_with_checksums() -> None:
    assert {a.name for a in FLICKR8K} == {"Flickr8k_Dataset.zip", "Flickr8k_text.zip"}
    for archive in FLICKR8K:
        assert archive.url == f"https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/{archive.name}"
        assert archive.digests and all(len(v) in (32, 64) for v in archive.digests.values())
