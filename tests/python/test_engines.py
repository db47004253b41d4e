"""The engines' replica choice (`grace eval --engine`, the sglang-*/vllm/vllm-ascend/trtllm routing policies)
against independent Python re-statements written from each engine's code (docs/deploy.md names the files):

* grace's C++ copy of CPython's random.Random against Python's own random module, draw for draw;
* SGLang's static dispatch tables (legacy same-GPU + _fair_choices with random.Random(42), and the newer
  _find_nearest_expert variant) re-implemented here with random.Random, against the C++ tables;
* `grace eval --engine NAME` on a generated OLMoE trace (2x4, plans with and without --slots-per-gpu) against a
  NumPy replay of what each engine does with `grace export`'s file: per-layer GPU loads and local selections
  equal, balancedness within 0.5%.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

import numpy as np

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
GRACE = os.environ.get("GRACE_BIN", os.path.join(BUILD, "tools", "grace", "grace"))
MODULE_DIR = os.path.join(BUILD, "python")

_grace = None
if os.path.isdir(os.path.join(MODULE_DIR, "grace")):
    sys.path.insert(0, MODULE_DIR)
    import grace  # noqa: E402

    if grace._EXT_ERROR is not None:
        raise SystemExit(f"grace._grace does not import: {grace._EXT_ERROR}")
    _grace = grace._grace


def run(*args):
    return subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)


def cli(*args):
    r = run(*args)
    if r.returncode != 0:
        raise AssertionError(f"grace {' '.join(map(str, args))} failed: {r.stderr}")
    return r


# ---------------------------------------------------------------------------------------------------------------
# SGLang's static dispatch, restated from python/sglang/srt/eplb/expert_location.py.


def fair_choices(arr, k, r):
    quotient, remainder = divmod(k, len(arr))
    ans = arr * quotient + r.sample(arr, k=remainder)
    r.shuffle(ans)
    return ans


def sglang_tables(phy2log, num_experts, nodes, gpus_per_node, nearest, seed=42):
    """[L, G, E] physical slot of each (layer, rank, expert)."""
    r = random.Random(seed)
    L, P = phy2log.shape
    G = nodes * gpus_per_node
    S = P // G
    out = np.full((L, G, num_experts), -1, dtype=np.int64)
    for l in range(L):
        for e in range(num_experts):
            cands = [p for p in range(P) if phy2log[l, p] == e]
            remaining = []
            for g in range(G):
                pick = -1
                same_gpu = [p for p in cands if p // S == g]
                if nearest and len(cands) == 1:
                    pick = cands[0]
                elif same_gpu:
                    pick = same_gpu[0]
                elif nearest:
                    same_node = [p for p in cands if p // (S * gpus_per_node) == g // gpus_per_node]
                    if 0 < len(same_node) < len(cands):
                        pick = same_node[0]
                out[l, g, e] = pick
                if pick == -1:
                    remaining.append(g)
            # Legacy SGLang calls _fair_choices with k = 0 too; it draws nothing then.
            if remaining or not nearest:
                for g, c in zip(remaining, fair_choices(cands, len(remaining), r)):
                    out[l, g, e] = c
    return out


# ---------------------------------------------------------------------------------------------------------------
# The other engines, restated from their code.


def replicas_of(row, num_experts):
    reps = [[] for _ in range(num_experts)]
    for p, e in enumerate(row):
        reps[e].append(p)
    return reps


def route_layer(engine, ids, homes, row, num_experts, G, table=None):
    """Physical slot of every selection [T, k] of one layer. Tokens of a rank are contiguous (homes sorted)."""
    T, k = ids.shape
    reps = replicas_of(row, num_experts)
    counts = np.array([len(x) for x in reps])
    padded = np.full((num_experts, counts.max()), -1)
    for e, x in enumerate(reps):
        padded[e, : len(x)] = x
    local = np.arange(T) - np.searchsorted(homes, homes)  # index of each token among its rank's tokens
    if engine == "sglang":
        return table[homes[:, None], ids]
    if engine == "vllm":
        idx = ((local.astype(np.uint64) * np.uint64(2654435769)) & np.uint64(0xFFFFFFFF)).astype(np.int64)
        return padded[ids, idx[:, None] % counts[ids]]
    if engine == "vllm-ascend":
        S = len(row) // G
        out = np.empty_like(ids)
        for g in range(G):
            # Rank g uses holder ranks (ascending) index g mod n; phy id = rank * S + local slot.
            pick = np.empty(num_experts, dtype=np.int64)
            for e in range(num_experts):
                holders = sorted({p // S for p in reps[e]})
                rank = holders[g % len(holders)]
                pick[e] = max(p for p in reps[e] if p // S == rank)
            sel = homes == g
            out[sel] = pick[ids[sel]]
        return out
    if engine == "trtllm":
        out = np.empty_like(ids)
        for g in range(G):
            sel = np.nonzero(homes == g)[0]
            flat_e = ids[sel].reshape(-1)
            f = np.arange(flat_e.size)
            block = f // 1024
            # c = earlier selections of the same expert in the same block, in flat order.
            order = np.lexsort((f, flat_e, block))
            key = block[order] * num_experts + flat_e[order]
            start = np.r_[0, np.nonzero(np.diff(key))[0] + 1]
            run_start = np.repeat(start, np.diff(np.r_[start, key.size]))
            c = np.empty_like(f)
            c[order] = np.arange(key.size) - run_start
            n = counts[flat_e]
            slot = padded[flat_e, (block + g + c) % n]
            out[sel] = slot.reshape(-1, k)
        return out
    raise ValueError(engine)


@unittest.skipIf(_grace is None, "the grace Python module was not built")
class PyRandomTest(unittest.TestCase):
    """grace's C++ random.Random against CPython's, draw for draw."""

    def ops(self):
        ops = [[0, b] for b in (1, 2, 7, 31, 32, 33, 63, 64)]
        ops += [[1, n] for n in (1, 2, 3, 5, 8, 100, 2**31 - 1, 2**40 + 7)]
        ops += [[2, n] for n in (0, 1, 2, 3, 8, 13, 40)]
        # sample: the pool method (n <= setsize) and the set method (n > setsize), k around the switch at 5.
        ops += [[3, n, k] for n, k in ((8, 0), (8, 3), (21, 5), (22, 5), (30, 6), (100, 6), (86, 6), (1000, 40))]
        return ops

    def python_draws(self, seed, ops):
        r = random.Random(seed)
        out = []
        for op in ops:
            if op[0] == 0:
                out.append([r.getrandbits(op[1])])
            elif op[0] == 1:
                out.append([r._randbelow(op[1])])
            elif op[0] == 2:
                x = list(range(op[1]))
                r.shuffle(x)
                out.append(x)
            else:
                out.append(r.sample(range(op[1]), op[2]))
        return out

    def test_draws_match_cpython(self):
        ops = self.ops()
        for seed in (0, 1, 42, 2**32 - 1, 2**32, 2**40 + 3):
            with self.subTest(seed=seed):
                self.assertEqual(_grace.py_random_draws(seed, ops), self.python_draws(seed, ops))

    def test_long_stream(self):
        # Past several state regenerations (624 words each).
        ops = [[2, 37]] * 200 + [[3, 64, 5]] * 100
        self.assertEqual(_grace.py_random_draws(42, ops), self.python_draws(42, ops))


@unittest.skipIf(_grace is None, "the grace Python module was not built")
class SglangTablesTest(unittest.TestCase):
    def random_map(self, rng, L, E, G, S, duplicates):
        rows = []
        for _ in range(L):
            slots = list(range(E)) + [int(x) for x in rng.integers(0, E, G * S - E)]
            rng.shuffle(slots)
            rows.append(slots)
        phy2log = np.array(rows)
        if not duplicates:  # make each GPU's experts distinct, as grace export writes them
            for l in range(L):
                while True:
                    per = phy2log[l].reshape(G, S)
                    bad = [g for g in range(G) if len(set(per[g])) < S]
                    if not bad:
                        break
                    rng.shuffle(phy2log[l])
        return phy2log

    def test_tables_match_restatement(self):
        rng = np.random.default_rng(5)
        for nodes, m, E, S, dup in ((1, 4, 8, 3, False), (2, 2, 6, 4, True), (2, 4, 16, 3, False), (3, 2, 5, 2, True)):
            G = nodes * m
            phy2log = self.random_map(rng, 4, E, G, S, dup)
            for nearest in (False, True):
                with self.subTest(topology=f"{nodes}x{m}", E=E, S=S, nearest=nearest):
                    want = sglang_tables(phy2log, E, nodes, m, nearest)
                    got = _grace.sglang_dispatch_tables(phy2log, E, f"{nodes}x{m}", nearest)
                    np.testing.assert_array_equal(got, want)

    def test_hand_worked_example(self):
        # 2 GPUs x 3 slots, E = 4: expert 0 on both GPUs, expert 1 twice on GPU 1, experts 2 and 3 once.
        phy2log = np.array([[0, 2, 3, 0, 1, 1]])
        got = _grace.sglang_dispatch_tables(phy2log, 4, "1x2")
        # Expert 0: each GPU its own slot (0, 3). Expert 1: GPU 1 its first slot 4; GPU 0 takes
        # _fair_choices([4, 5], 1) from random.Random(42), which is [4]. Experts 2, 3: the GPU lacking them takes
        # the only slot. Worked by hand with Python 3.11: fair_choices([4, 5], 1) -> [4], then [1], then [2].
        self.assertEqual(got[0].tolist(), [[0, 4, 1, 2], [3, 4, 1, 2]])
        # With nearest, experts with one slot draw nothing; the result is the same here.
        self.assertEqual(_grace.sglang_dispatch_tables(phy2log, 4, "1x2", True)[0].tolist(), [[0, 4, 1, 2], [3, 4, 1, 2]])


class EngineEvalTest(unittest.TestCase):
    """grace eval --engine against a NumPy replay of the engine's routing over grace export's file."""

    N, M = 2, 4

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        cls.trace = os.path.join(d, "olmoe.npy")
        cli("gen", "--preset", "olmoe", "--tokens", 8192, "-o", cls.trace)
        cli("profile", cls.trace, "-o", os.path.join(d, "stats"), "--topology", f"{cls.N}x{cls.M}")
        cls.plans = {}
        for name, extra in (("grace", []), ("grace-s20", ["--slots-per-gpu", 20]),
                            ("eplb", ["--method", "eplb-hierarchical+eplb"])):
            path = os.path.join(d, name + ".json")
            method = [] if "--method" in extra else ["--method", "grace"]
            cli("plan", "--stats", os.path.join(d, "stats"), "--topology", f"{cls.N}x{cls.M}", *method, *extra,
                "-o", path)
            cls.plans[name] = path
        cls.ids = np.load(cls.trace)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def check(self, plan_name, engine, routing=None, layer_offset=0):
        d = self.tmp.name
        plan = self.plans[plan_name]
        exported = os.path.join(d, f"{plan_name}-{engine}.sglang.json")
        cli("export", plan, "--format", "sglang", "--layer-offset", layer_offset, "-o", exported)
        with open(exported) as f:
            rows = np.array(json.load(f)["physical_to_logical_map"])
        phy2log = rows[layer_offset:]
        stem = os.path.join(d, f"{plan_name}-{engine}-{routing}")
        args = ["eval", "--trace", self.trace, "--plan", plan, "--comm", "hsc", "--engine", engine, "-o", stem]
        if routing:
            args += ["--routing", routing]
        if layer_offset:
            args += ["--layer-offset", layer_offset]
        cli(*args)
        with open(stem + ".json") as f:
            rep = json.load(f)
        T, L, k = self.ids.shape
        E = int(self.ids.max()) + 1
        G = self.N * self.M
        S = phy2log.shape[1] // G
        homes = (np.arange(T, dtype=np.int64) * G) // T
        tables = None
        if engine == "sglang":
            # SGLang draws over every row of the file, the dense layers' trivial rows first.
            tables = sglang_tables(rows, E, self.N, self.M, nearest=routing == "sglang-nearest")[layer_offset:]
        local_total = 0
        balanced = []
        for l in range(L):
            ids = self.ids[:, l, :].astype(np.int64)
            slots = route_layer(engine, ids, homes, phy2log[l], E, G, None if tables is None else tables[l])
            self.assertTrue(np.all(phy2log[l][slots] == ids), "a selection went to a slot of another expert")
            gpus = slots // S
            local = int(np.sum(gpus == homes[:, None]))
            load = np.bincount(gpus.reshape(-1), minlength=G)
            self.assertEqual(rep["layers"][l]["local_selections"], local, f"layer {l}")
            self.assertEqual(rep["layers"][l]["gpu_load"], load.tolist(), f"layer {l}")
            local_total += local
            balanced.append(load.mean() / load.max())
        self.assertEqual(rep["total"]["local_selections"], local_total)
        want = float(np.mean(balanced))
        self.assertLess(abs(rep["total"]["balancedness"] - want) / want, 0.005)
        return rep

    def test_sglang_static(self):
        for plan in ("grace", "grace-s20", "eplb"):
            with self.subTest(plan=plan):
                rep = self.check(plan, "sglang")
                self.assertEqual(rep["policy"], "sglang-static")
                self.assertTrue(rep["method"].endswith("@sglang"))

    def test_sglang_with_dense_layers(self):
        # A model whose first 3 layers are dense: SGLang's random stream starts on their trivial rows.
        self.check("grace-s20", "sglang", layer_offset=3)
        self.check("grace-s20", "sglang", "sglang-nearest", layer_offset=3)

    def test_sglang_nearest(self):
        for plan in ("grace", "grace-s20"):
            with self.subTest(plan=plan):
                self.check(plan, "sglang", "sglang-nearest")

    def test_other_engines(self):
        for engine in ("vllm", "vllm-ascend", "trtllm"):
            for plan in ("grace-s20", "eplb"):
                with self.subTest(engine=engine, plan=plan):
                    self.check(plan, engine)

    def assert_one_line_error(self, r, needle):
        self.assertNotEqual(r.returncode, 0)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertTrue(lines[0].startswith("grace: error:"), r.stderr)
        self.assertIn(needle, lines[0])

    def test_bad_input(self):
        d = self.tmp.name
        stem = os.path.join(d, "bad")
        base = ["eval", "--trace", self.trace, "--comm", "hsc", "-o", stem]
        # A plan for another expert count.
        other = os.path.join(d, "other.npy")
        cli("gen", "--preset", "olmoe", "--tokens", 512, "-o", other)
        ids = np.load(other)
        np.save(other, np.minimum(ids, 31).astype(ids.dtype))
        with open(other.replace(".npy", ".json")) as f:
            meta = json.load(f)
        meta["num_experts"] = 32
        with open(other.replace(".npy", ".json"), "w") as f:
            json.dump(meta, f)
        r = run("eval", "--trace", other, "--plan", self.plans["grace"], "--comm", "hsc", "--engine", "sglang",
                "-o", stem)
        self.assert_one_line_error(r, "experts")
        # A slot count the plan cannot meet, and one above E.
        r = run(*base, "--plan", self.plans["grace"], "--engine", "sglang", "--slots-per-gpu", 2)
        self.assert_one_line_error(r, "slots per GPU")
        r = run(*base, "--plan", self.plans["grace"], "--engine", "sglang", "--slots-per-gpu", 65)
        self.assert_one_line_error(r, "65")
        # Unknown engine, a routing the engine does not run, engine-only options without --engine.
        self.assert_one_line_error(run(*base, "--plan", self.plans["grace"], "--engine", "tgi"), "tgi")
        self.assert_one_line_error(run(*base, "--plan", self.plans["grace"], "--engine", "vllm", "--routing", "tar"),
                                   "tar")
        self.assert_one_line_error(run(*base, "--plan", self.plans["grace"], "--slots-per-gpu", 20), "--engine")
        self.assertFalse(os.path.exists(stem + ".json"))
        self.assertFalse(os.path.exists(stem + ".csv"))

    def test_slots_per_gpu_pads_to_the_engine_slot_count(self):
        stem = os.path.join(self.tmp.name, "s12")
        r = cli("eval", "--trace", self.trace, "--plan", self.plans["eplb"], "--comm", "hsc", "--engine", "sglang",
                "--slots-per-gpu", 12, "-o", stem)
        self.assertIn("8 GPUs x 12 slots = 96 physical experts", r.stdout)

    def test_compare_engine_rows(self):
        out = os.path.join(self.tmp.name, "cmp")
        r = cli("compare", "--trace", self.trace, "--topology", f"{self.N}x{self.M}", "--engine", "sglang",
                "--slots-per-gpu", 10, "-o", out)
        for row in ("EPLB in sglang", "GRACE in sglang", "GRACE native"):
            self.assertIn(row, r.stdout)
        with open(os.path.join(out, "compare.json")) as f:
            cmp = json.load(f)
        self.assertEqual(cmp["reference"], "EPLB in sglang")
        by = {e["name"]: e for e in cmp["entries"]}
        # The EPLB placement fills its 10 slots exactly, so SGLang runs it unpadded: the row equals the plan's own
        # sglang-static evaluation (the EPLB+SGLang row).
        self.assertEqual(by["EPLB in sglang"]["total"]["local_selections"],
                         by["EPLB+SGLang"]["total"]["local_selections"])
        self.assertEqual(by["EPLB in sglang"]["total"]["gpu_load"], by["EPLB+SGLang"]["total"]["gpu_load"])
        self.assertEqual(by["GRACE native"]["total"], by["GRACE"]["total"])  # both the default method
        # GRACE in sglang is the grace export (10 slots per GPU) under SGLang's dispatch: the same as grace eval
        # --engine sglang on the saved grace plan.
        plan = os.path.join(out, "plans", "priced_priced_tar-2x4_10.json")
        stem = os.path.join(self.tmp.name, "cmp-eval")
        cli("eval", "--trace", self.trace, "--plan", plan, "--comm", "hsc", "--engine", "sglang",
            "--slots-per-gpu", 10, "--stats", os.path.join(self.tmp.name, "stats"), "-o", stem)
        with open(stem + ".json") as f:
            rep = json.load(f)
        self.assertEqual(rep["total"]["local_selections"], by["GRACE in sglang"]["total"]["local_selections"])
        self.assertEqual(rep["total"]["gpu_load"], by["GRACE in sglang"]["total"]["gpu_load"])
        bad = run("compare", "--trace", self.trace, "--topology", "2x4", "--engine", "tgi", "-o", out + "-bad")
        self.assert_one_line_error(bad, "tgi")
        self.assertFalse(os.path.exists(out + "-bad"))


if __name__ == "__main__":
    unittest.main()
