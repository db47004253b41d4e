#!/usr/bin/python3
"""The engine routing hooks (grace.engines) pick exactly what the C++ router picks.

A generated OLMoE trace (4 layers, 64 experts, top-8) is planned on 2x4, once without a slot count (the export
pads) and once slot-exact (--slots-per-gpu 10). For TAR and WRR, grace.engines.routing.TableRouter routes the
trace in batches of uneven sizes, state carried from batch to batch, and every selection's physical slot must be
the slot, in the exported physical map, of the instance grace.ReplicaRouter (the C++ router) picks for the same
selection; the WRR counters must agree after every batch. Then: one rank's tables with an int source (what an
engine process uses), CUDA-graph padding rows that must not advance the counters, and the SGLang / vLLM
replacement functions on stand-ins for the engines' objects (the engines are not installed here).

Needs PyTorch (Debian python3-torch); skips with a message without it.
"""
import json
import os
import subprocess
import sys
import tempfile
import types
import unittest

import numpy as np

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
GRACE = os.environ.get("GRACE_BIN", os.path.join(BUILD, "tools", "grace", "grace"))
MODULE_DIR = os.path.join(BUILD, "python")

if not os.path.isdir(os.path.join(MODULE_DIR, "grace")):
    print(f"SKIP: {MODULE_DIR}/grace not built (configure with -DGRACE_BUILD_PYTHON=ON)")
    sys.exit(0)
sys.path.insert(0, MODULE_DIR)
import grace  # noqa: E402

if grace._EXT_ERROR is not None:
    raise SystemExit(f"grace._grace does not import: {grace._EXT_ERROR}")

try:
    import torch
except ImportError:
    torch = None
else:
    from grace.engines.routing import moe_layer_map

NO_TORCH = "PyTorch is not installed (Debian: apt-get install python3-torch); the engine-hook tests need it"
BATCHES = [37, 500, 1, 1200, 263, 999]  # uneven sizes, so counters wrap mid-batch


def run(*args):
    r = subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"grace {' '.join(map(str, args))}: {r.stderr}"
    return r


@unittest.skipIf(torch is None, NO_TORCH)
class EngineHookTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from grace.engines.routing import TableRouter

        cls.TableRouter = TableRouter
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.tmp.name
        trace = os.path.join(d, "olmoe.npy")
        run("gen", "--preset", "olmoe", "--tokens", sum(BATCHES), "--layers", 4, "--seed", 11, "-o", trace)
        cls.ids = grace.load_trace(trace)["ids"]  # [T, L, k]
        cls.plans = {}
        for name, extra in (("padded", []), ("slot-exact", ["--slots-per-gpu", 10])):
            path = os.path.join(d, name + ".json")
            run("plan", "--trace", trace, "--topology", "2x4", "--method", "grace", *extra, "-q", "-o", path)
            with open(path) as f:
                cls.plans[name] = json.load(f)
        rng = np.random.default_rng(5)
        cls.sources = rng.integers(0, 8, size=cls.ids.shape[0])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def expected_slots(self, plan, phy2log, layer, cpp_gpus, ids):
        """The physical slot of expert ids[t, j] on GPU cpp_gpus[t, j] (one instance per GPU and expert)."""
        S = phy2log.shape[1] // 8
        out = np.empty_like(ids)
        for (t, j), g in np.ndenumerate(cpp_gpus):
            local = np.nonzero(phy2log[layer, g * S:(g + 1) * S] == ids[t, j])[0]
            self.assertEqual(local.size, 1)
            out[t, j] = g * S + local[0]
        return out

    def check_against_cpp(self, plan_name, policy):
        plan = self.plans[plan_name]
        phy2log = grace.physical_map(plan)["phy2log"]
        router = self.TableRouter(plan, policy=policy)
        L = plan["num_layers"]
        cpp = [grace.ReplicaRouter(plan, l, policy) for l in range(L)]
        start = 0
        for size in BATCHES:
            src = self.sources[start:start + size]
            for l in range(L):
                ids = self.ids[start:start + size, l, :]
                got = router.route(l, torch.from_numpy(ids), torch.from_numpy(src)).numpy()
                self.assertEqual(got.dtype, ids.dtype)
                cpp_gpus = cpp[l].route_tokens(ids, src, start)
                want = self.expected_slots(plan, phy2log, l, cpp_gpus, ids)
                np.testing.assert_array_equal(got, want, err_msg=f"{plan_name} {policy} layer {l} batch at {start}")
                np.testing.assert_array_equal(router.offsets[l].numpy(), cpp[l].offsets)
            start += size
        return router

    def test_tar_matches_cpp_router(self):
        for name in self.plans:
            with self.subTest(plan=name):
                self.check_against_cpp(name, "tar")

    def test_wrr_matches_cpp_router(self):
        for name in self.plans:
            with self.subTest(plan=name):
                self.check_against_cpp(name, "wrr")

    def test_slot_exact_export_pads_nothing_and_hook_uses_its_slots(self):
        pm = grace.physical_map(self.plans["slot-exact"])
        self.assertEqual(pm["num_padded"], 0)
        self.assertEqual(pm["slots_per_gpu"], 10)
        router = self.TableRouter(self.plans["slot-exact"], policy="tar")
        self.assertEqual(router.num_physical, 80)

    def test_padded_export_padding_slots_never_picked(self):
        plan = self.plans["padded"]
        pm = grace.physical_map(plan)
        self.assertGreater(pm["num_padded"], 0)
        router = self.TableRouter(plan, policy="wrr")
        S = pm["slots_per_gpu"]
        for l in range(plan["num_layers"]):
            gpu_experts = plan["layers"][l]["gpu_experts"]
            planned = {p for p in range(pm["phy2log"].shape[1]) if pm["phy2log"][l, p] in gpu_experts[p // S]}
            self.assertEqual(len(planned), sum(len(x) for x in gpu_experts))
            got = router.route(l, torch.from_numpy(self.ids[:, l, :]), torch.from_numpy(self.sources)).numpy()
            self.assertTrue(set(got.ravel().tolist()) <= planned)

    def test_one_rank_tables_with_int_source(self):
        plan = self.plans["slot-exact"]
        rank = 5
        mine = self.TableRouter(plan, policy="tar", ranks=[rank])
        self.assertEqual(tuple(mine.sequences.shape[1:3]), (1, 64))
        everyone = self.TableRouter(plan, policy="tar")
        start = 0
        for size in BATCHES[:4]:
            ids = torch.from_numpy(self.ids[start:start + size, 2, :]).to(torch.int32)
            src = torch.full((size,), rank, dtype=torch.int64)
            a = mine.route(2, ids, rank)
            b = everyone.route(2, ids, src)
            self.assertEqual(a.dtype, torch.int32)
            self.assertTrue(torch.equal(a, b))
            start += size
        with self.assertRaises(grace.GraceError):
            mine.route(2, ids, 4)
        # A NumPy integer is a rank too; an empty batch (a DP rank without tokens) routes to an empty result.
        self.assertTrue(torch.equal(mine.route(2, ids, np.int64(rank)), everyone.route(2, ids, src)))
        empty = mine.route(2, torch.zeros((0, 8), dtype=torch.int32), rank)
        self.assertEqual(tuple(empty.shape), (0, 8))

    def test_padding_rows_do_not_advance_counters(self):
        plan = self.plans["slot-exact"]
        a = self.TableRouter(plan, policy="tar")
        b = self.TableRouter(plan, policy="tar")
        ids = torch.from_numpy(self.ids[:300, 0, :])
        src = torch.from_numpy(self.sources[:300])
        valid = 220
        got = a.route(0, ids, src, valid_tokens=torch.tensor(valid))
        want = b.route(0, ids[:valid], src[:valid])
        self.assertTrue(torch.equal(got[:valid], want))
        self.assertTrue(torch.equal(a.offsets, b.offsets))
        # The next batch continues from the same state in both.
        self.assertTrue(torch.equal(a.route(0, ids, src), b.route(0, ids, src)))

    def rank_router(self, rank):
        from grace.engines.routing import RankRouter

        return RankRouter(self.plans["slot-exact"], rank=rank, policy="tar", device="cpu")

    def test_sglang_replacement(self):
        from grace.engines import sglang as hook

        router = self.rank_router(3)
        reference = self.TableRouter(self.plans["slot-exact"], policy="tar", ranks=[3])
        calls = []

        def sglang_own(topk_ids, info):
            calls.append(info)
            return topk_ids + 1000

        fn = hook.make_logical_to_physical(router, moe_layer_map(4, 1), sglang_own)
        ids = torch.from_numpy(self.ids[:64, 1, :]).to(torch.int32)
        self.assertIs(fn(ids, None), ids)
        info = types.SimpleNamespace(grace_layer=2, num_physical_experts=80)  # decoder 2 = MoE layer 1
        self.assertTrue(torch.equal(fn(ids, info), reference.route(1, ids, 3)))
        self.assertTrue(torch.equal(router.get().offsets, reference.offsets))
        dense = types.SimpleNamespace(grace_layer=0, num_physical_experts=80)  # before the offset: SGLang's own
        self.assertTrue(torch.equal(fn(ids, dense), ids + 1000))
        self.assertEqual(calls, [dense])
        with self.assertRaisesRegex(grace.GraceError, "--ep-num-redundant-experts"):
            fn(ids, types.SimpleNamespace(grace_layer=2, num_physical_experts=72))

    def test_sglang_install_patches_and_uninstall_restores(self):
        """install() on stand-ins for the two SGLang modules it touches (same names and call signatures)."""
        from grace.engines import sglang as hook

        dispatch = types.ModuleType("sglang.srt.eplb.expert_location_dispatch")

        class ExpertLocationDispatchInfo:
            def __init__(self, num_physical_experts):
                self.num_physical_experts = num_physical_experts

            @classmethod
            def init_new(cls, layer_id):
                return cls(num_physical_experts=80)

        def topk_ids_logical_to_physical(topk_ids, info):
            return topk_ids + 1000

        dispatch.ExpertLocationDispatchInfo = ExpertLocationDispatchInfo
        dispatch.topk_ids_logical_to_physical = topk_ids_logical_to_physical
        topk = types.ModuleType("sglang.srt.layers.moe.topk")
        topk.topk_ids_logical_to_physical = topk_ids_logical_to_physical  # imported by name, as topk.py does
        names = ["sglang", "sglang.srt", "sglang.srt.eplb", "sglang.srt.layers", "sglang.srt.layers.moe"]
        fakes = {n: types.ModuleType(n) for n in names}
        fakes["sglang"].srt = fakes["sglang.srt"]
        fakes["sglang.srt"].eplb = fakes["sglang.srt.eplb"]
        fakes["sglang.srt.eplb"].expert_location_dispatch = dispatch
        fakes.update({dispatch.__name__: dispatch, topk.__name__: topk})

        def body():
            installed = hook.install(self.plans["slot-exact"], rank=2, policy="wrr", layer_offset=0, device="cpu")
            self.assertIs(topk.topk_ids_logical_to_physical, dispatch.topk_ids_logical_to_physical)
            self.assertIsNot(topk.topk_ids_logical_to_physical, topk_ids_logical_to_physical)
            reference = self.TableRouter(self.plans["slot-exact"], policy="wrr", ranks=[2])
            ids = torch.from_numpy(self.ids[:100, 3, :])
            for _ in range(3):  # counters carried across forward passes
                info = ExpertLocationDispatchInfo.init_new(layer_id=3)
                self.assertEqual(info.grace_layer, 3)
                self.assertTrue(torch.equal(topk.topk_ids_logical_to_physical(ids, info), reference.route(3, ids, 2)))
            installed.uninstall()
            self.assertIs(topk.topk_ids_logical_to_physical, topk_ids_logical_to_physical)
            self.assertIs(dispatch.topk_ids_logical_to_physical, topk_ids_logical_to_physical)
            self.assertFalse(hasattr(ExpertLocationDispatchInfo.init_new(layer_id=3), "grace_layer"))

        self.with_fake_modules(fakes, body)

    def test_vllm_replacement_routes_and_records_load(self):
        from grace.engines import vllm as hook

        router = self.rank_router(6)
        reference = self.TableRouter(self.plans["slot-exact"], policy="tar", ranks=[6])
        fallback_calls = []

        def vllm_own(self_, topk_ids):
            fallback_calls.append(self_)
            return topk_ids

        valid = 40
        fn = hook.make_apply_eplb_mapping(router, vllm_own, num_unpadded=lambda: valid)
        state = types.SimpleNamespace(expert_load_view=torch.zeros(80, dtype=torch.int64),
                                      should_record_tensor=torch.tensor(1, dtype=torch.int32))
        moe = types.SimpleNamespace(grace_layer=3, enable_eplb=True, eplb_state=state)
        ids = torch.from_numpy(self.ids[:48, 3, :])
        got = fn(moe, ids)
        want = reference.route(3, ids, 6, valid_tokens=valid)
        self.assertTrue(torch.equal(got, want))
        self.assertTrue(torch.equal(state.expert_load_view, torch.bincount(got.reshape(-1), minlength=80)))
        state.should_record_tensor.zero_()
        before = state.expert_load_view.clone()
        fn(moe, ids)
        self.assertTrue(torch.equal(state.expert_load_view, before))
        untagged = types.SimpleNamespace(enable_eplb=True, eplb_state=state)
        self.assertIs(fn(untagged, ids), ids)
        self.assertEqual(fallback_calls, [untagged])
        small = types.SimpleNamespace(grace_layer=3, enable_eplb=True,
                                      eplb_state=types.SimpleNamespace(expert_load_view=torch.zeros(64)))
        with self.assertRaisesRegex(grace.GraceError, "num_redundant_experts"):
            fn(small, ids)

    def with_fake_modules(self, fakes, body):
        saved = {n: sys.modules.get(n) for n in fakes}
        sys.modules.update(fakes)
        try:
            body()
        finally:
            for n, m in saved.items():
                if m is None:
                    sys.modules.pop(n, None)
                else:
                    sys.modules[n] = m

    def test_vllm_install_attach_and_uninstall(self):
        """install() + attach() on a stand-in for vLLM's BaseRouter and a model with vLLM's module names."""
        from grace.engines import vllm as hook

        class BaseRouter:
            def __init__(self, eplb_state):
                self.enable_eplb, self.eplb_state = True, eplb_state

            def _apply_eplb_mapping(self, topk_ids):
                return topk_ids + 1000

        original = BaseRouter._apply_eplb_mapping
        base = types.ModuleType("vllm.model_executor.layers.fused_moe.router.base_router")
        base.BaseRouter = BaseRouter
        parts = "vllm.model_executor.layers.fused_moe.router".split(".")
        fakes = {".".join(parts[:i]): types.ModuleType(".".join(parts[:i])) for i in range(1, len(parts) + 1)}
        for i in range(1, len(parts)):
            setattr(fakes[".".join(parts[:i])], parts[i], fakes[".".join(parts[:i + 1])])
        fakes[".".join(parts)].base_router = base
        fakes[base.__name__] = base

        def body():
            installed = hook.install(self.plans["slot-exact"], rank=1, policy="tar", layer_offset=0, device="cpu")
            model = torch.nn.Module()
            model.model = torch.nn.Module()
            model.model.layers = torch.nn.ModuleList()
            states = []
            for _ in range(4):
                block = torch.nn.Module()
                block.mlp = torch.nn.Module()
                block.mlp.experts = torch.nn.Module()
                states.append(types.SimpleNamespace(expert_load_view=torch.zeros(80, dtype=torch.int64),
                                                    should_record_tensor=torch.tensor(1)))
                block.mlp.experts.router = BaseRouter(states[-1])
                model.model.layers.append(block)
            self.assertEqual(installed.attach(model), 4)
            reference = self.TableRouter(self.plans["slot-exact"], policy="tar", ranks=[1])
            ids = torch.from_numpy(self.ids[:80, 2, :])
            r2 = model.model.layers[2].mlp.experts.router
            for _ in range(2):
                self.assertTrue(torch.equal(r2._apply_eplb_mapping(ids), reference.route(2, ids, 1)))
            self.assertEqual(int(states[2].expert_load_view.sum()), 2 * ids.numel())
            installed.uninstall()
            self.assertIs(BaseRouter._apply_eplb_mapping, original)
            self.assertTrue(torch.equal(r2._apply_eplb_mapping(ids), ids + 1000))

        self.with_fake_modules(fakes, body)

    @unittest.skipIf(torch is None or not torch.distributed.is_available(), "torch.distributed is not available")
    def test_rank_router_built_when_process_group_is_up(self):
        from grace.engines.routing import RankRouter

        if torch.distributed.is_initialized():
            self.skipTest("a process group is already initialized")
        lazy = RankRouter(self.plans["slot-exact"], policy="tar", device="cpu")
        self.assertIsNone(lazy._router)  # no rank yet: built at first use
        store = os.path.join(self.tmp.name, "pg")
        torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
        try:
            router = lazy.get()
            self.assertEqual(lazy.rank, 0)
            self.assertEqual(router.ranks, [0])
            self.assertIs(lazy.get(), router)
        finally:
            torch.distributed.destroy_process_group()

    def test_vllm_attach_reads_layer_from_module_names(self):
        from grace.engines import vllm as hook

        class Router:
            def _apply_eplb_mapping(self, topk_ids):
                return topk_ids

        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList()
        for _ in range(5):
            block = torch.nn.Module()
            block.experts = torch.nn.Module()
            block.experts.router = Router()
            model.layers.append(block)
        installed = hook.Installed(None, moe_layer_map(4, 1), Router, Router._apply_eplb_mapping)
        self.assertEqual(installed.attach(model), 4)
        self.assertFalse(hasattr(model.layers[0].experts.router, "grace_layer"))
        self.assertEqual([model.layers[i].experts.router.grace_layer for i in range(1, 5)], [0, 1, 2, 3])

    def test_bad_input_is_a_grace_error(self):
        plan = self.plans["slot-exact"]
        with self.assertRaisesRegex(grace.GraceError, "no pick sequences"):
            self.TableRouter(plan, policy="sglang-static")
        with self.assertRaisesRegex(grace.GraceError, "rank 8 is outside"):
            self.TableRouter(plan, ranks=[8])
        own = grace.physical_map(plan)["phy2log"]
        with self.assertRaisesRegex(grace.GraceError, "has no slot"):
            self.TableRouter(plan, phy2log=np.roll(own, 1, axis=1))
        with self.assertRaisesRegex(grace.GraceError, "shape"):
            self.TableRouter(plan, phy2log=np.zeros((3, 80), dtype=np.int64))
        with self.assertRaisesRegex(grace.GraceError, "must be \\[T, k\\]"):
            self.TableRouter(plan).route(0, torch.zeros(8, dtype=torch.int64), 0)

    def test_cpp_router_binding_tables(self):
        plan = self.plans["slot-exact"]
        r = grace.ReplicaRouter(plan, 0, "tar")
        seq = r.flat_sequences()
        self.assertEqual(seq.dtype, np.uint8)
        self.assertEqual(seq.shape, (8, 64, r.period))
        for s, e in ((0, 0), (7, 63), (3, 17)):
            np.testing.assert_array_equal(seq[s, e], r.sequence(s, e))
        r.route_tokens(self.ids[:10, 0, :], self.sources[:10])
        offsets = r.offsets.copy()
        self.assertEqual(offsets.shape, (8, 64))
        self.assertEqual(int(offsets.sum()), 80)
        r.reset()
        r.offsets = offsets
        np.testing.assert_array_equal(r.offsets, offsets)
        with self.assertRaisesRegex(grace.GraceError, "outside"):
            r.offsets = np.full((8, 64), r.period, dtype=np.int32)
        with self.assertRaises(grace.GraceError):
            grace.ReplicaRouter(plan, 0, "vllm").flat_sequences()


if __name__ == "__main__":
    unittest.main()
