"""grace.converters on small files written in SGLang's and vLLM's documented layouts (.pt where PyTorch is
importable, and the same data as .json / .npz), checked against ground truth built independently here."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
# The build copy carries the compiled extension (used to cross-check with the C++ loaders); else the sources.
PKG = os.path.join(BUILD, "python") if os.path.exists(os.path.join(BUILD, "python", "grace", "converters.py")) \
    else os.path.join(SRC, "python")
sys.path.insert(0, PKG)

import grace  # noqa: E402
from grace.converters import (ConversionError, sglang_per_token_to_trace, sglang_stat_to_stats,  # noqa: E402
                              vllm_eplb_to_stats)
from grace.tracefile import read_stats, read_trace  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

HAVE_EXT = hasattr(grace, "_grace") or grace._EXT_ERROR is None


def make_per_token(rng, num_layers_all=3, dense=(0,), e=6, p=8, k=2, passes=((0, 5), (1, 4)), ranks=2):
    """Ground-truth logical ids and an SGLang per_token dump with physical ids (redundant replicas)."""
    # physical slot -> logical expert, per layer: every logical expert at least once, two redundant slots
    p2l = np.zeros((num_layers_all, p), np.int64)
    for l in range(num_layers_all):
        base = rng.permutation(e)
        p2l[l] = np.concatenate([base, rng.choice(e, p - e, replace=False)])
    moe = [l for l in range(num_layers_all) if l not in dense]
    records, truth = [], []
    for fp, n in passes:
        for rank in range(ranks):  # DP attention: each rank its own tokens
            logical = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(n)]) for _ in moe], 1)
            truth.append(logical)
            phys = np.full((num_layers_all, n, 8), -1, np.int32)
            for li, l in enumerate(moe):
                for t in range(n):
                    for j in range(k):
                        slots = np.flatnonzero(p2l[l] == logical[t, li, j])
                        phys[l, t, j] = rng.choice(slots)
            records.append(dict(forward_pass_id=fp, rank=rank, input_ids=list(range(n)), positions=list(range(n)),
                                extend_seq_lens=[n], forward_mode=1, topk_ids_of_layer=phys, misc_objects=[]))
    return p2l, records, np.concatenate(truth, 0), moe


def dump_pt(path, records, p2l):
    recs = [dict(r, topk_ids_of_layer=torch.from_numpy(r["topk_ids_of_layer"])) for r in records]
    torch.save(dict(records=recs, last_physical_to_logical_map=torch.from_numpy(p2l)), path)


def dump_json(path, records, p2l):
    recs = [dict(r, topk_ids_of_layer=r["topk_ids_of_layer"].tolist()) for r in records]
    with open(path, "w") as f:
        json.dump(dict(records=recs, last_physical_to_logical_map=p2l.tolist()), f)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=PKG)
    return subprocess.run([sys.executable, "-m", "grace.convert", *args], capture_output=True, text=True, env=env)


class PerToken(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = self.tmp.name
        self.rng = np.random.default_rng(7)
        self.p2l, self.records, self.truth, self.moe = make_per_token(self.rng)

    def tearDown(self):
        self.tmp.cleanup()

    def check(self, paths):
        out = os.path.join(self.d, "trace.npy")
        ids, meta = sglang_per_token_to_trace(paths, out, model="m", dataset="d")
        self.assertEqual(ids.shape, self.truth.shape)
        np.testing.assert_array_equal(ids, self.truth)  # (forward pass, rank, token) order, logical ids
        self.assertEqual(meta["moe_layers"], self.moe)
        self.assertEqual(meta["num_experts"], 6)
        ids2, w, m = read_trace(out)
        np.testing.assert_array_equal(ids2, self.truth)
        self.assertIsNone(w)
        self.assertEqual(m["format"], "grace.trace/v1")
        if HAVE_EXT:  # the C++ loader accepts it and reads the same ids
            t = grace.load_trace(out)
            np.testing.assert_array_equal(t["ids"], self.truth)
            self.assertEqual((t["num_experts"], t["model"], t["dataset"]), (6, "m", "d"))

    def test_json_one_file(self):
        p = os.path.join(self.d, "dump.json")
        dump_json(p, self.records, self.p2l)
        self.check([p])

    def test_npz_concatenated(self):
        p = os.path.join(self.d, "dump.npz")
        ordered = sorted(self.records, key=lambda r: (r["forward_pass_id"], r["rank"]))
        np.savez(p, topk_ids_of_layer=np.concatenate([r["topk_ids_of_layer"] for r in ordered], 1),
                 last_physical_to_logical_map=self.p2l)
        self.check(p)

    @unittest.skipIf(torch is None, "PyTorch not importable: .pt dumps not tested")
    def test_pt_one_file_per_rank_with_tp_duplicates(self):
        paths = []
        for rank in (1, 0):  # file order must not matter
            recs = [r for r in self.records if r["rank"] == rank]
            paths.append(os.path.join(self.d, f"{rank}.pt"))
            dump_pt(paths[-1], recs, self.p2l)
        # a third rank that saw rank 0's tokens (tensor parallel): deduplicated
        dup = [dict(r, rank=2) for r in self.records if r["rank"] == 0]
        # same ids, different rank: keep key excludes rank, so these are dropped
        paths.append(os.path.join(self.d, "2.pt"))
        dump_pt(paths[-1], dup, self.p2l)
        self.check(paths)

    def test_inconsistent_map_raises(self):
        bad = self.p2l.copy()
        l = self.moe[0]
        # make every slot of layer l map to one expert: tokens then pick one logical expert twice
        bad[l] = 0
        p = os.path.join(self.d, "bad.json")
        dump_json(p, self.records, bad)
        with self.assertRaisesRegex(ConversionError, "does not match the ids"):
            sglang_per_token_to_trace(p)
        # a map with fewer physical slots than the ids use
        p2 = os.path.join(self.d, "short.json")
        dump_json(p2, self.records, self.p2l[:, :5])
        with self.assertRaisesRegex(ConversionError, "outside the map"):
            sglang_per_token_to_trace(p2)
        r = run_cli("sglang-trace", p, "-o", os.path.join(self.d, "x.npy"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("grace.convert: error:", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.d, "x.npy")))

    def test_missing_map_raises(self):
        p = os.path.join(self.d, "nomap.json")
        with open(p, "w") as f:
            json.dump({"records": []}, f)
        with self.assertRaisesRegex(ConversionError, "last_physical_to_logical_map"):
            sglang_per_token_to_trace(p)

    def test_cli(self):
        p = os.path.join(self.d, "dump.json")
        dump_json(p, self.records, self.p2l)
        out = os.path.join(self.d, "cli.npy")
        r = run_cli("sglang-trace", p, "-o", out, "--model", "ds", "--ranks", "0")
        self.assertEqual(r.returncode, 0, r.stderr)
        ids, _, meta = read_trace(out)
        n0, n1 = 5, 4  # rank 0's tokens of pass 0 then pass 1
        want = np.concatenate([self.truth[0:n0], self.truth[2 * n0:2 * n0 + n1]])
        np.testing.assert_array_equal(ids, want)
        self.assertEqual(meta["model"], "ds")


class LoadStats(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = self.tmp.name
        self.rng = np.random.default_rng(3)

    def tearDown(self):
        self.tmp.cleanup()

    def check_folder(self, out, load, top_k):
        s = read_stats(out)
        np.testing.assert_array_equal(s["load"], load)
        self.assertEqual(s["affinity"].shape, (load.shape[0], load.shape[1], load.shape[1]))
        self.assertFalse(s["affinity"].any())
        self.assertEqual(s["meta"]["format"], "grace.stats/v1")
        self.assertEqual(s["meta"]["affinity_known"], False)
        if top_k:
            self.assertEqual(s["meta"]["num_tokens"], int(load.sum(1).max()) // top_k)
        if HAVE_EXT and hasattr(grace, "load_stats"):  # the C++ reader accepts the folder
            c = grace.load_stats(out)
            np.testing.assert_array_equal(c["load"], load)

    def sglang_counts(self):
        lc = self.rng.integers(0, 50, size=(3, 3, 6)).astype(np.int32)
        lc[:, 0, :] = 0  # a dense layer
        lc[:, 1:, 0] += 1
        for l in (1, 2):
            for s in range(3):
                if lc[s, l].sum() % 2:
                    lc[s, l, 1] += 1
        want = np.zeros((2, 6), np.int64)
        for s in range(3):
            for li, l in enumerate((1, 2)):
                for e in range(6):
                    want[li, e] += int(lc[s, l, e])
        return lc, want

    def test_sglang_stat_json_npy(self):
        lc, want = self.sglang_counts()
        p = os.path.join(self.d, "stat.json")
        with open(p, "w") as f:
            json.dump({"rank": 0, "logical_count": lc.tolist(), "average_utilization_rate_over_window": None}, f)
        out = os.path.join(self.d, "stats")
        r = sglang_stat_to_stats(p, out, top_k=2)
        np.testing.assert_array_equal(r["load"], want)
        self.assertEqual(r["meta"]["moe_layers"], [1, 2])
        self.check_folder(out, want, 2)
        p2 = os.path.join(self.d, "stat.npy")
        np.save(p2, lc)
        out2 = os.path.join(self.d, "stats2")
        r = run_cli("sglang-stats", p2, "-o", out2, "--top-k", "2")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.check_folder(out2, want, 2)

    @unittest.skipIf(torch is None, "PyTorch not importable: .pt dumps not tested")
    def test_sglang_stat_pt(self):
        lc, want = self.sglang_counts()
        p = os.path.join(self.d, "expert_distribution_recorder_1.pt")
        torch.save(dict(rank=0, logical_count=torch.from_numpy(lc), average_utilization_rate_over_window=None), p)
        out = os.path.join(self.d, "stats")
        sglang_stat_to_stats(p, out, top_k=2)
        self.check_folder(out, want, 2)

    def test_sglang_stat_bad(self):
        p = os.path.join(self.d, "bad.json")
        with open(p, "w") as f:
            json.dump({"rank": 0, "records": []}, f)
        with self.assertRaisesRegex(ConversionError, "logical_count"):
            sglang_stat_to_stats(p)
        with open(p, "w") as f:
            json.dump({"logical_count": [1, 2, 3]}, f)
        with self.assertRaisesRegex(ConversionError, "shape"):
            sglang_stat_to_stats(p)

    def vllm_window(self):
        w = self.rng.integers(0, 30, size=(4, 2, 8)).astype(np.int32)
        m = np.array([[0, 1, 2, 3, 4, 5, 2, -1], [5, 4, 3, 2, 1, 0, 0, 1]], np.int64)
        w[:, 0, 7] = 0  # unused slot carries no load
        want = np.zeros((2, 6), np.int64)
        for l in range(2):
            for p in range(8):
                if m[l, p] >= 0:
                    want[l, m[l, p]] += int(w[:, l, p].sum())
        return w, m, want

    def test_vllm_npz_and_arrays(self):
        w, m, want = self.vllm_window()
        p = os.path.join(self.d, "eplb.npz")
        np.savez(p, expert_load_window=w, physical_to_logical_map=m)
        out = os.path.join(self.d, "stats")
        r = run_cli("vllm-stats", p, "-o", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.check_folder(out, want, 0)
        # per-rank windows [ranks, window, L, P] are summed
        r = vllm_eplb_to_stats(expert_load_window=np.stack([w, w]), physical_to_logical_map=m)
        np.testing.assert_array_equal(r["load"], 2 * want)

    @unittest.skipIf(torch is None, "PyTorch not importable: .pt dumps not tested")
    def test_vllm_pt(self):
        w, m, want = self.vllm_window()
        p = os.path.join(self.d, "eplb.pt")
        torch.save(dict(expert_load_window=torch.from_numpy(w), physical_to_logical_map=torch.from_numpy(m)), p)
        r = vllm_eplb_to_stats(p, os.path.join(self.d, "s"))
        np.testing.assert_array_equal(r["load"], want)

    def test_vllm_bad(self):
        w, m, _ = self.vllm_window()
        w[0, 0, 7] = 5
        with self.assertRaisesRegex(ConversionError, "marks it unused"):
            vllm_eplb_to_stats(expert_load_window=w, physical_to_logical_map=m)
        with self.assertRaisesRegex(ConversionError, "shape"):
            vllm_eplb_to_stats(expert_load_window=w, physical_to_logical_map=m[:, :6])
        with self.assertRaisesRegex(ConversionError, "outside"):
            vllm_eplb_to_stats(expert_load_window=w * 0, physical_to_logical_map=m, num_experts=5)


if __name__ == "__main__":
    unittest.main(verbosity=2)
