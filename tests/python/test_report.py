#!/usr/bin/env python3
"""`grace demo` / `grace compare` outputs: the report renders in a real browser (headless Chromium: every table
and figure laid out, no broken image), the SVG figures are well-formed, compare.json is consistent with
`grace eval` on the saved plans, and the cross-dataset section is present."""
import html
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import unittest
import urllib.parse
import xml.etree.ElementTree as ET
import zlib

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
CHROMIUM = "/usr/bin/chromium"

# Added to a copy of report.html before </body>. After the load event (every image fetched and decoded) it writes
# the layout of every table and image into the DOM, for --dump-dom to print; the fixed square is for the one
# pixel check.
MARKER_RGB = (255, 0, 255)
PROBE_SCRIPT = """
<div style="position:fixed;left:0;top:0;width:64px;height:64px;background:rgb(255,0,255);z-index:2147483647"></div>
<script>
window.addEventListener("load", function () {
  function size(e) { var r = e.getBoundingClientRect(); return {width: r.width, height: r.height}; }
  var out = {tables: [], images: []};
  document.querySelectorAll("table").forEach(function (t) {
    out.tables.push(Object.assign(size(t), {rows: t.rows.length}));
  });
  document.querySelectorAll("img").forEach(function (i) {
    out.images.push(Object.assign(size(i), {src: i.getAttribute("src"), complete: i.complete,
                                            naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));
  });
  var pre = document.createElement("pre");
  pre.id = "grace-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


class TagCounter(html.parser.HTMLParser):
    """Counts start tags by name."""

    def __init__(self):
        super().__init__()
        self.counts = {"table": 0, "img": 0}

    def handle_starttag(self, tag, attrs):
        if tag in self.counts:
            self.counts[tag] += 1


def run(*args, timeout=600):
    return subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def decode_png(path):
    """(width, height, rows of RGB(A) bytes) of an 8-bit non-interlaced PNG, with zlib only."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0 and color in (2, 6), f"unsupported PNG {header}"
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev, i = [], bytearray(stride), 0
    for _ in range(height):
        ftype, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if ftype == 1:
                line[x] = (line[x] + a) & 255
            elif ftype == 2:
                line[x] = (line[x] + b) & 255
            elif ftype == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


class Report(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.out = os.path.join(cls.tmp.name, "demo")
        cls.demo = run("demo", "--tokens", 8192, "-o", cls.out)
        cls.report = os.path.join(cls.out, "report")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_demo_prints_table_and_writes_report(self):
        self.assertEqual(self.demo.returncode, 0, self.demo.stderr)
        for needle in ["Occult", "+DR+TAR", "EPLB+vLLM", "Vanilla", "Cross-dataset", "2x2", "2x4"]:
            self.assertIn(needle, self.demo.stdout)
        for name in ["report.html", "compare.json", "compare.csv", "compare1.json", "fig0_affinity.svg",
                     "fig0_load.svg", "fig0_knee.svg", "fig0_traffic.svg", "fig0_time.svg"]:
            self.assertTrue(os.path.exists(os.path.join(self.report, name)), name)

    def test_svgs_are_well_formed(self):
        for name in os.listdir(self.report):
            if name.endswith(".svg"):
                root = ET.parse(os.path.join(self.report, name)).getroot()
                self.assertTrue(root.tag.endswith("svg"), name)
                self.assertGreater(len(list(root.iter())), 20, name)

    def test_compare_json_rows_and_relative_changes(self):
        c = load_json(os.path.join(self.report, "compare.json"))
        names = {e["name"] for e in c["entries"]}
        for row in ["Occult", "Occult+HSC", "HG+HSC", "+FR+WRR", "+DR+WRR", "+DR+TAR", "Vanilla", "EPLB+vLLM",
                    "EPLB+SGLang"]:
            self.assertIn(row, names)
        for e in c["entries"]:
            if e["name"] == "Occult":
                self.assertEqual(e["relative_to_reference"]["cross_node_copies"], 0)
            # Occult and Occult+HSC share a plan: same loads, only the communication differs.
        by = {(e["name"], e["topology"]): e for e in c["entries"]}
        for topo in ["2x2", "2x4"]:
            o, h = by[("Occult", topo)], by[("Occult+HSC", topo)]
            self.assertEqual(o["total"]["gpu_load"], h["total"]["gpu_load"])
            self.assertLessEqual(h["total"]["cross_node_copies"], o["total"]["cross_node_copies"])
        cross = load_json(os.path.join(self.report, "compare1.json"))
        self.assertNotEqual(cross["profile_dataset"], cross["dataset"])

    def test_compare_matches_eval_on_saved_plans(self):
        c = load_json(os.path.join(self.report, "compare.json"))
        trace = os.path.join(self.out, "traces", "olmoe-wikitext.npy")
        for e in c["entries"]:
            if e["name"] not in ("+DR+TAR", "EPLB+vLLM") or e["topology"] != "2x4":
                continue
            plan = os.path.join(self.report, "plans", e["method"].replace("+", "_") + "-2x4.json")
            stem = os.path.join(self.tmp.name, "eval_" + e["name"].replace("+", "_"))
            r = run("eval", "--trace", trace, "--plan", plan, "--comm", e["scheme"], "-o", stem)
            self.assertEqual(r.returncode, 0, r.stderr)
            got = load_json(stem + ".json")["total"]
            for key in ["cross_node_copies", "intra_node_copies", "gpu_idle_time_s", "moe_layer_time_s", "end_to_end_s"]:
                self.assertAlmostEqual(got[key], e["total"][key], places=9, msg=key)

    def test_compare_command_and_bad_topology(self):
        trace = os.path.join(self.out, "traces", "olmoe-wikitext.npy")
        other = os.path.join(self.out, "traces", "olmoe-github.npy")
        out = os.path.join(self.tmp.name, "cmp")
        r = run("compare", "--trace", trace, "--profile-trace", other, "--topology", "2x2", "--hardware", "h100-ib",
                "-o", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        c = load_json(os.path.join(out, "compare.json"))
        self.assertEqual(c["hardware"], "h100-ib")
        self.assertEqual({e["topology"] for e in c["entries"]}, {"2x2"})
        bad = run("compare", "--trace", trace, "--topology", "2y2", "-o", out + "2")
        self.assertNotEqual(bad.returncode, 0)
        self.assertTrue(bad.stderr.startswith("grace: error:"), bad.stderr)
        self.assertFalse(os.path.exists(out + "2"))

    def test_compare_is_identical_for_any_thread_count(self):
        trace = os.path.join(self.out, "traces", "olmoe-wikitext.npy")
        outs = []
        for threads in (1, 2):
            out = os.path.join(self.tmp.name, f"det{threads}")
            r = run("compare", "--trace", trace, "--topology", "2x4", "--threads", threads, "-o", out)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(os.path.join(out, "compare.json"), "rb") as f:
                outs.append(f.read())
        self.assertEqual(outs[0], outs[1])

    def test_compare_shows_the_paper_workloads(self):
        # The demo's 8192-token trace is too short for either workload: skipped with a note.
        c = load_json(os.path.join(self.report, "compare.json"))
        self.assertEqual(c["workloads"], [])
        self.assertTrue(any("workload 256x128+16 skipped: it needs 36864 tokens but the trace has 8192" in n
                            for n in c["notes"]), c["notes"])
        # 36864 tokens hold one 256x(128+16) round, not a 512x(64+32) one; each row's workload report is what
        # grace eval --workload prices on the saved plan.
        trace = os.path.join(self.tmp.name, "wl.npy")
        r = run("gen", "--tokens", 36864, "--no-weights", "--layers", 4, "-o", trace)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = os.path.join(self.tmp.name, "cmp_wl")
        r = run("compare", "--trace", trace, "--topology", "2x2", "--threads", 2, "-o", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("256x128+16 prefill", r.stdout)
        c = load_json(os.path.join(out, "compare.json"))
        self.assertEqual(c["workloads"], [{"workload": "256x128+16", "rounds": 1, "num_tokens": 36864}])
        self.assertTrue(any("workload 512x64+32 skipped" in n for n in c["notes"]), c["notes"])
        by = {e["name"]: e for e in c["entries"]}
        for name in ("+DR+TAR", "Occult"):
            e = by[name]
            [w] = e["workloads"]
            self.assertEqual(w["workload"], "256x128+16")
            plan = os.path.join(out, "plans", e["method"].replace("+", "_") + "-2x2.json")
            stem = os.path.join(self.tmp.name, "wl_" + name.replace("+", "_"))
            r = run("eval", "--trace", trace, "--plan", plan, "--comm", e["scheme"], "--workload", "256x128+16",
                    "-o", stem)
            self.assertEqual(r.returncode, 0, r.stderr)
            got = load_json(stem + ".json")
            phases = {p["phase"]: p["total"] for p in got["phases"]}
            for key in ["cross_node_copies", "all_to_all_time_s", "end_to_end_s"]:
                self.assertAlmostEqual(w["total"][key], got["total"][key], places=9, msg=key)
                self.assertAlmostEqual(w["prefill"][key], phases["prefill"][key], places=9, msg=key)
                self.assertAlmostEqual(w["decode"][key], phases["decode"][key], places=9, msg=key)
        self.assertEqual(by["Occult"]["workloads"][0]["end_to_end_speedup"], 1)
        with open(os.path.join(out, "compare.csv")) as f:
            self.assertIn("256x128+16_decode_end_to_end_s", f.readline())
        with open(os.path.join(out, "report.html")) as f:
            self.assertIn("256x128+16 decode ms", f.read())

    def render_probe(self, *mode_args):
        """Runs headless Chromium on a copy of report.html with PROBE_SCRIPT added; returns stdout (bytes)."""
        if not os.path.exists(CHROMIUM):
            self.skipTest("chromium is not installed (apt-get install chromium): cannot render report.html")
        with open(os.path.join(self.report, "report.html")) as f:
            page = f.read()
        self.assertIn("<head>", page)
        self.assertIn("</body>", page)
        # The copy lives outside the report folder; <base> resolves the figures' relative paths against it.
        base = '<base href="file://' + urllib.parse.quote(os.path.abspath(self.report)) + '/">'
        page = page.replace("<head>", "<head>" + base, 1).replace("</body>", PROBE_SCRIPT + "</body>", 1)
        probe = os.path.join(self.tmp.name, "probe.html")
        with open(probe, "w") as f:
            f.write(page)
        profile = tempfile.mkdtemp()
        try:
            r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
                                "--virtual-time-budget=10000", *mode_args, "file://" + probe],
                               capture_output=True, timeout=180)
        except subprocess.TimeoutExpired:
            self.fail("headless chromium did not finish rendering report.html within 180 s")
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        return r

    def test_report_renders_every_table_and_figure(self):
        # What the page must show, whatever the data: every table and figure of report.html laid out with a
        # non-zero size, and every figure image decoded (a missing or malformed SVG has naturalWidth 0).
        with open(os.path.join(self.report, "report.html")) as f:
            source = TagCounter()
            source.feed(f.read())
        self.assertGreater(source.counts["table"], 0)
        self.assertGreater(source.counts["img"], 0)
        r = self.render_probe("--window-size=1200,900", "--dump-dom")
        dom = r.stdout.decode("utf-8", "replace")
        m = re.search(r'<pre id="grace-probe">(.*?)</pre>', dom, re.S)
        self.assertIsNotNone(m, "the probe script left no result in the DOM: " + r.stderr.decode()[-500:])
        probe = json.loads(html.unescape(m.group(1)))
        self.assertEqual(len(probe["tables"]), source.counts["table"])
        self.assertEqual(len(probe["images"]), source.counts["img"])
        for i, t in enumerate(probe["tables"]):
            self.assertGreater(t["rows"], 1, f"table {i} has no data rows")
            self.assertTrue(t["width"] > 0 and t["height"] > 0, f"table {i} is not laid out: {t}")
        srcs = set()
        for img in probe["images"]:
            srcs.add(img["src"])
            self.assertTrue(img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0,
                            f"broken image: {img}")
            self.assertTrue(img["width"] > 0 and img["height"] > 0, f"image not laid out: {img}")
        for name in ["fig0_affinity.svg", "fig0_load.svg", "fig0_knee.svg", "fig0_traffic.svg", "fig0_time.svg"]:
            self.assertIn(name, srcs)

    def test_report_screenshot_shows_the_marker(self):
        # The one pixel check, independent of the data and the fonts: the fixed-colour square the probe adds in the
        # top-left corner is painted, and beside it the body's 24 px top margin shows the white page background.
        shot = os.path.join(self.tmp.name, "probe.png")
        self.render_probe("--window-size=320,240", f"--screenshot={shot}")
        self.assertTrue(os.path.exists(shot), "chromium wrote no screenshot")
        width, height, bpp, rows = decode_png(shot)
        self.assertEqual((width, height), (320, 240))
        inside = [rows[y][x * bpp:x * bpp + 3] for y in range(8, 56, 4) for x in range(8, 56, 4)]
        self.assertEqual(set(inside), {bytes(MARKER_RGB)})
        margin = {rows[y][x * bpp:x * bpp + 3] for y in (2, 10) for x in range(80, 320, 8)}
        self.assertEqual(margin, {bytes((255, 255, 255))})

if __name__ == "__main__":
    unittest.main(verbosity=2)
