#!/usr/bin/env python3
"""`grace demo` / `grace compare` outputs: the report renders in a real browser (headless Chromium screenshot
that must not be blank), the SVG figures are well-formed, compare.json is consistent with `grace eval` on the
saved plans, and the cross-dataset section is present."""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest
import xml.etree.ElementTree as ET
import zlib

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
CHROMIUM = "/usr/bin/chromium"


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

    def test_report_screenshot_is_not_blank(self):
        if not os.path.exists(CHROMIUM):
            self.skipTest("chromium is not installed (apt-get install chromium): cannot render report.html")
        shot = os.path.join(self.tmp.name, "report.png")
        profile = tempfile.mkdtemp()
        try:
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2400",
                            "file://" + os.path.abspath(os.path.join(self.report, "report.html"))],
                           capture_output=True, timeout=120)
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        self.assertTrue(os.path.exists(shot), "chromium wrote no screenshot")
        width, height, bpp, rows = decode_png(shot)
        self.assertEqual((width, height), (1200, 2400))
        non_white = colored = 0
        for row in rows:
            for x in range(0, width * bpp, bpp * 4):  # every 4th pixel
                r, g, b = row[x], row[x + 1], row[x + 2]
                if r < 240 or g < 240 or b < 240:
                    non_white += 1
                if max(r, g, b) - min(r, g, b) > 60:
                    colored += 1
        total = height * ((width + 3) // 4)
        # Text and tables alone cover a few percent; the figures add strongly coloured areas.
        self.assertGreater(non_white / total, 0.03, f"screenshot looks blank ({non_white}/{total} non-white)")
        self.assertGreater(colored / total, 0.01, f"no figure colours in the screenshot ({colored}/{total})")


if __name__ == "__main__":
    unittest.main(verbosity=2)
