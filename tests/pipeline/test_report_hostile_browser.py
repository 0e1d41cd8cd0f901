"""Hostile text and images in the report, opened in headless Chromium: nothing executes.

A whole run (the `bicro-clean run` command, tiny encoder) over shards whose captions, keys, sample-JSON urls and
a shard's file name carry script payloads, where some samples also have an SVG member with a <script> and some
PNGs carry script text in a tEXt chunk. Every payload calls pwn("<its id>") when it runs; a helper script put at
the very top of the page defines pwn, which leaves a <pre class="pwned"> in the DOM that --dump-dom prints.

The report is opened twice, with its Content-Security-Policy and with the policy removed (the escaping alone must
hold), and a probe script moves the threshold slider over every position of every column (so the report's own
script renders every example pair), clicks every non-http(s) link and lists what the DOM holds that could run
code: event-handler attributes, URL attributes other than JPEG data: URIs and http(s) links, embedding elements,
script elements other than the report's own. Two control pages prove the probe is real: the same payloads
written into a page raw do fire (and the report's policy blocks the handler and javascript: ones among them),
and the report's own script runs under that policy without a violation in the browser console.

Skipped when no chromium binary is installed (apt-get install -y chromium).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from conftest import tar_bytes
from report_fixture import BROWSER_FLAGS, chromium, dump_dom, slider_data
from bicro_clean.pipeline.report.gallery import image_tag
from bicro_clean.pipeline.report.thumbnails import Thumb, shown_uri

pytestmark = pytest.mark.slow  # one small whole run through the CLI (12-35 s on 2 shared cores), six browser starts

SCRIPT = Path(sys.executable).with_name("bicro-clean")

# Each payload's id is the argument of its pwn() call. Keys cannot hold dots (the key ends at the first one) or
# control characters (unsafe_member_name); '/' makes tar directories, which a key may have.
CAPTIONS = {
    "cap-script": '</script><script>pwn("cap-script")</script>',
    "cap-attr": '"><img src=x onerror=pwn("cap-attr")>',
    "cap-svg": "<svg onload=pwn('cap-svg')><script>pwn('cap-svg-script')</script></svg>",
    "cap-href": "<a href=\"javascript:pwn('cap-href')\">click</a>",
    "cap-2028": "\u2028</script>\u2029<script>pwn('cap-2028')</script>",
    "cap-comment": "<!--<script>pwn('cap-comment')</script>",
}
KEYS = {
    "key-script": "</script><script>pwn('key-script')</script>",
    "key-attr": "\"><img src=x onerror=pwn('key-attr')>",
    "key-svg": "'><svg onload=pwn('key-svg')>",
    "key-comment": "<!--<script>pwn('key-comment')</script>",
}
URLS = {
    "url-js": "javascript:pwn('url-js')",
    "url-js-case": " JaVaScRiPt:pwn('url-js-case')",
    "url-data": "data:text/html,<script>pwn('url-data')</script>",
}
SHARD_NAME = "01'\"><svg onload=pwn('shard-name')>.tar"
SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" onload="pwn(\'svg-onload\')">'
       b'<script>pwn("svg-script")</script></svg>')
PNG_TEXT = "<script>pwn('png-text')</script>"
SAMPLES_PER_SHARD = 20

# Defines pwn before anything else on the page (ahead of the CSP meta, so a policy never blocks it).
HELPER = """<script id="hostile-helper">
window.pwn = function (id) {
  var p = document.createElement("pre");
  p.className = "pwned";
  p.textContent = String(id);
  document.documentElement.appendChild(p);
  document.title = "PWNED " + id;
};
</script>"""

# Runs after the page's own script: drives the slider over every position of every column, collecting the
# caption and key texts the report's script rendered, clicks every link that is not http(s), then lists
# everything in the DOM that could run code. The list lands in <pre id="audit">, which --dump-dom prints.
PROBE = r"""<script id="hostile-probe">
(function () {
  var audit = {handlers: [], urls: [], embeds: [], scripts: [], captions: {}, keys: {}, cards: 0};
  var range = document.getElementById("th-slider"), select = document.getElementById("th-column");
  function collect() {
    document.querySelectorAll(".th-pair").forEach(function (card) {
      audit.cards += 1;
      card.querySelectorAll(".cap").forEach(function (e) { audit.captions[e.textContent] = 1; });
      card.querySelectorAll(".key").forEach(function (e) { audit.keys[e.textContent] = 1; });
    });
  }
  if (range && select) {
    for (var c = 0; c < select.options.length; c++) {
      select.selectedIndex = c;
      select.dispatchEvent(new Event("change", {bubbles: true}));
      for (var k = +range.min; k <= +range.max; k++) {
        range.value = k;
        range.dispatchEvent(new Event("input", {bubbles: true}));
        collect();
      }
    }
  }
  var web = /^https?:\/\//i;
  document.querySelectorAll("a").forEach(function (a) {
    var href = a.getAttribute("href") || a.getAttribute("xlink:href") || "";
    if (!web.test(href.trim())) { a.dispatchEvent(new MouseEvent("click", {bubbles: true, cancelable: true})); }
  });
  var urlAttrs = ["href", "xlink:href", "src", "srcset", "action", "formaction", "data", "srcdoc", "poster",
                  "background", "ping", "codebase", "cite", "longdesc", "manifest"];
  var embeds = ["iframe", "frame", "frameset", "object", "embed", "applet", "form", "base", "link", "portal"];
  var all = document.getElementsByTagName("*");
  for (var i = 0; i < all.length; i++) {
    var el = all[i], tag = el.localName;
    if (embeds.indexOf(tag) >= 0) { audit.embeds.push(tag); }
    if (tag === "script") { audit.scripts.push([el.getAttribute("type") || "", el.id]); }
    for (var j = 0; j < el.attributes.length; j++) {
      var name = el.attributes[j].name.toLowerCase(), value = el.attributes[j].value.trim();
      if (name.indexOf("on") === 0) { audit.handlers.push(tag + " " + name); }
      if (urlAttrs.indexOf(name) < 0) { continue; }
      var ok = (tag === "img" && name === "src" && value.indexOf("data:image/jpeg;base64,") === 0) ||
               (tag === "a" && name === "href" && web.test(value));
      if (!ok) { audit.urls.push(tag + " " + name + "=" + value.slice(0, 60)); }
    }
  }
  audit.captions = Object.keys(audit.captions);
  audit.keys = Object.keys(audit.keys);
  audit.kept = (document.getElementById("th-kept") || {}).textContent || "";
  var pre = document.createElement("pre");
  pre.id = "audit";
  pre.textContent = JSON.stringify(audit);
  document.body.appendChild(pre);
})();
</script>"""

CSP_META = re.compile(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">')

# What the raw control page must show: every payload below runs when written into a page unescaped
# (javascript: links when clicked); the report's policy must let only the inline <script> ones through.
SCRIPT_PAYLOADS = {"cap-script", "cap-svg-script", "cap-2028", "key-script", "json-script"}
HANDLER_AND_URL_PAYLOADS = {"cap-attr", "cap-svg", "cap-href", "key-attr", "key-svg", "url-js", "url-js-case"}


# ---------------------------------------------------------------- the hostile run


def _png(i: int, text: str | None) -> bytes:
    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", text)
    buffer = io.BytesIO()
    colour = (37 * i % 256, (255 - 23 * i) % 256, 71 * i % 256)
    Image.new("RGB", (32, 24), colour).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _sample(i: int) -> list[tuple[str, bytes]]:
    """Sample i: a hostile key, caption and url; every 3rd also has an SVG member, every 4th a PNG with script
    text in a tEXt chunk."""
    key = f"{i:03d}" + list(KEYS.values())[i % len(KEYS)]
    caption = f"colour {i % 10} " + list(CAPTIONS.values())[i % len(CAPTIONS)]
    meta = {"url": list(URLS.values())[i % len(URLS)], "uid": f"{i:032x}"}
    members = [(f"{key}.png", _png(i, PNG_TEXT if i % 4 == 0 else None)), (f"{key}.txt", caption.encode()),
               (f"{key}.json", json.dumps(meta).encode())]
    if i % 3 == 0:
        members.append((f"{key}.svg", SVG))
    return members


def _write_shards(folder: Path) -> None:
    folder.mkdir(parents=True)
    for s, name in enumerate(("00000.tar", SHARD_NAME)):
        members = [m for i in range(s * SAMPLES_PER_SHARD, (s + 1) * SAMPLES_PER_SHARD) for m in _sample(i)]
        members += [(f"svgaspng{s}.png", SVG), (f"svgaspng{s}.txt", b"SVG bytes in a .png member")]
        (folder / name).write_bytes(tar_bytes(members))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    _write_shards(root / "shards")
    out = root / "out"
    done = subprocess.run([str(SCRIPT), "run", "--input", str(root / "shards"), "--out", str(out), "--encoder",
                           "tiny", "--epochs", "2", "--keep-fraction", "0.5"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def page(run) -> str:
    return (run / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- opening pages in the browser


def _open(html_text: str, folder: Path, name: str) -> tuple[list[str], dict, str]:
    """html_text with HELPER at the top and PROBE at the end, opened in Chromium: the ids of the payloads that
    ran, the probe's audit (empty when the probe did not run) and the dumped DOM."""
    assert html_text.count("<head>") == 1 and html_text.count("</body>") == 1
    probed = html_text.replace("<head>", "<head>" + HELPER, 1).replace("</body>", PROBE + "</body>", 1)
    path = folder / f"{name}.html"
    path.write_text(probed, encoding="utf-8")
    dom = dump_dom(path, folder / f"profile-{name}")
    fired = [html.unescape(found) for found in re.findall(r'<pre class="pwned">(.*?)</pre>', dom, re.S)]
    audit = re.search(r'<pre id="audit">(.*?)</pre>', dom, re.S)
    return fired, json.loads(html.unescape(audit.group(1))) if audit else {}, dom


def _control_page(policy: str | None) -> str:
    """The payloads written raw, the way an unescaped report would hold them: as markup, as links, and inside
    a JSON <script> block that does not escape '<' (the slider data's failure mode). The comment payloads are
    left out: raw, they only comment out the rest of the page (inside a script block, see the report checks)."""
    meta = f'<meta http-equiv="Content-Security-Policy" content="{html.escape(policy)}">' if policy else ""
    raw = [p for p in (*CAPTIONS.values(), *KEYS.values()) if "<!--" not in p]
    links = "".join(f'<p><a href="{html.escape(url)}">source</a></p>' for url in URLS.values())
    data = json.dumps({"key": KEYS["key-script"].replace("key-script", "json-script")})
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{meta}<title>control</title></head><body>'
            f'{"".join(f"<div>{p}</div>" for p in raw)}{links}'
            f'<script type="application/json" id="data">{data}</script></body></html>\n')


def _assert_nothing_ran(fired: list[str], audit: dict, dom: str) -> None:
    assert fired == [], f"payloads ran: {fired}"
    assert audit, "the probe did not run: " + dom[-2000:]
    assert "<title>bicro-clean report</title>" in dom
    assert audit["handlers"] == [] and audit["urls"] == [] and audit["embeds"] == []
    # the helper, the slider's JSON data, the report's own script and the probe: no other script element
    assert audit["scripts"] == [["", "hostile-helper"], ["application/json", "threshold-data"], ["", ""],
                                ["", "hostile-probe"]]
    assert re.fullmatch(r"[\d,]+", audit["kept"]) and audit["cards"] > 0  # the report's script ran


# ---------------------------------------------------------------- the tests


def test_hostile_rows_reach_the_report_as_text(run, page):
    """The payloads are in the run's outputs and on the page, escaped: the checks below test real rows."""
    annotated = pq.read_table(run / "annotated").to_pylist()
    assert {row["url"] for row in annotated if row["url"]} == set(URLS.values())
    assert {row["reason"] for row in annotated if row["key"].startswith("svgaspng")} == {"decode_error"}
    data = slider_data(page)
    for payload in (*CAPTIONS.values(), *KEYS.values()):
        assert html.escape(payload) in page, f"no gallery card shows {payload!r}"
        assert any(payload in x["caption"] or payload in x["key"] for x in data["examples"]), payload
    for raw in ("<script>pwn", "<img src=x", "<svg onload", '<a href="javascript', "javascript:pwn('url"):
        assert raw not in page, raw  # as markup, or the url fields (which the report does not show) anywhere


def test_images_are_only_reencoded_jpeg_data_uris(page):
    uris = re.findall(r"data:[^\"'\s)]*", CSP_META.sub("", page))  # img src attributes and the slider's data
    assert len(uris) > 20 and "svg+xml" not in page
    for uri in uris:
        assert uri.startswith("data:image/jpeg;base64,"), uri[:60]
        data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert data[:3] == b"\xff\xd8\xff" and b"pwn(" not in data and b"<script" not in data
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG"
    # the samples with an SVG member and those with script text in a PNG chunk have thumbnails on the page
    shown = {x["key"][:3] for x in slider_data(page)["examples"] if x["img"]}
    assert {f"{i:03d}" for i in range(0, 2 * SAMPLES_PER_SHARD, 3)} & shown
    assert {f"{i:03d}" for i in range(0, 2 * SAMPLES_PER_SHARD, 4)} & shown


def test_nothing_executes_in_the_report(page, tmp_path):
    assert len(CSP_META.findall(page)) == 1
    fired, audit, dom = _open(page, tmp_path, "report")
    _assert_nothing_ran(fired, audit, dom)
    # every example pair was drawn by the report's script, its caption and key shown as the literal text
    for payload in CAPTIONS.values():
        assert any(payload in caption for caption in audit["captions"]), payload
    for payload in KEYS.values():
        assert any(payload in key for key in audit["keys"]), payload


def test_the_report_runs_under_its_policy_without_a_violation(run, tmp_path):
    """The report's own script runs under its policy without a single violation in the console."""
    done = subprocess.run([chromium(), *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--enable-logging=stderr", "--v=0", "--dump-dom", (run / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120, check=True)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert re.search(r'id="th-kept">[\d,]+<', done.stdout)


def test_escaping_alone_holds_without_the_policy(page, tmp_path):
    fired, audit, dom = _open(CSP_META.sub("", page), tmp_path, "no-policy")
    assert "Content-Security-Policy" not in dom
    _assert_nothing_ran(fired, audit, dom)


def test_the_probe_sees_raw_payloads_run(tmp_path):
    """Control: the same payloads unescaped do run, and the probe's audit lists the handlers and the links."""
    fired, audit, _ = _open(_control_page(None), tmp_path, "control")
    assert SCRIPT_PAYLOADS | HANDLER_AND_URL_PAYLOADS <= set(fired), fired
    assert audit["handlers"] and any("javascript:" in url.lower() for url in audit["urls"])
    assert ["", "hostile-probe"] in audit["scripts"] and len(audit["scripts"]) > 3


def test_the_report_policy_blocks_handlers_and_javascript_urls(page, tmp_path):
    """Defence in depth: under the report's own policy, raw event handlers and javascript: links do not run
    (inline <script> elements must, for the report's own script; escaping keeps others out)."""
    policy = CSP_META.search(page).group(1)
    fired, audit, _ = _open(_control_page(html.unescape(policy)), tmp_path, "control-policy")
    assert audit, "the probe did not run under the report's policy"
    assert SCRIPT_PAYLOADS <= set(fired), fired
    assert not HANDLER_AND_URL_PAYLOADS & set(fired), fired


def test_only_jpeg_data_uris_are_embedded():
    """A thumbnail URI that is not the base64 JPEG the report cuts (an SVG one could carry script) is not shown."""
    jpeg = "data:image/jpeg;base64,/9j/4AAQ"
    assert shown_uri(Thumb(jpeg, "")) == jpeg
    for uri in ("data:image/svg+xml;base64,PHN2Zz4=", "javascript:alert(1)", 'data:image/jpeg;base64,"><b',
                "data:image/jpeg;base64,AA AA", None):
        assert shown_uri(Thumb(uri, "")) is None
        assert "<img" not in image_tag(Thumb(uri, ""), "caption")
    assert shown_uri(None) is None
