#!/usr/bin/env python3
"""`grace export --model-config config.json`: the plan is checked against the served model, and the launch flags
printed match the file written.

A slot-exact plan (2x4, 10 slots per GPU: P = 80, R = 16) of a generated 4-layer, 64-expert trace is exported with
Hugging Face configs the test writes: a Qwen3-MoE-like model (every layer MoE), a DeepSeek-V3-like one (decoder
layer 0 dense: layer offset 1), an OLMoE one. The printed flags carry R, G, the file and the offset; the SGLang map
gets one row per decoder layer. A model whose experts, MoE layers, offset or layer layout do not fit the plan, and
OLMoE for SGLang (no expert-location hook there), are one-line errors that write nothing.
"""
import json
import os
import subprocess
import tempfile
import unittest

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")


def run(*args):
    return subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)


class ExportModelConfigTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        trace = os.path.join(cls.dir, "t.npy")
        cls.plan = os.path.join(cls.dir, "plan.json")
        for args in (["gen", "--preset", "olmoe", "--tokens", 3000, "--layers", 4, "--seed", 3, "-o", trace],
                     ["plan", "--trace", trace, "--topology", "2x4", "--slots-per-gpu", 10, "--method", "grace",
                      "-q", "-o", cls.plan]):
            r = run(*args)
            assert r.returncode == 0, r.stderr

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def config(self, name, fields):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            json.dump(fields, f)
        return path

    def qwen3(self, name="qwen3.json", **over):
        fields = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                  "moe_intermediate_size": 768, "num_experts": 64, "num_experts_per_tok": 8,
                  "num_hidden_layers": 4, "decoder_sparse_step": 1, "mlp_only_layers": []}
        fields.update(over)
        return self.config(name, fields)

    def deepseek(self, name="dsv3.json", **over):
        fields = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 2048,
                  "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_experts_per_tok": 8,
                  "num_hidden_layers": 5, "first_k_dense_replace": 1, "moe_layer_freq": 1}
        fields.update(over)
        return self.config(name, fields)

    def olmoe(self):
        return self.config("olmoe.json", {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
                                          "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 4})

    def export(self, fmt, config, out, *extra):
        path = os.path.join(self.dir, out)
        return run("export", self.plan, "--format", fmt, "--model-config", config, "-o", path, *extra), path

    def assert_fails(self, r, path, *parts):
        self.assertNotEqual(r.returncode, 0)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertTrue(lines[0].startswith("grace: error: "), lines[0])
        for p in parts:
            self.assertIn(p, lines[0])
        self.assertFalse(os.path.exists(path), "a failed export must write nothing")

    def test_sglang_flags_and_rows(self):
        r, path = self.export("sglang", self.qwen3(), "q.json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("exported", r.stdout)  # the existing summary line stays
        self.assertIn(f"launch flags (SGLang): --ep-size 8 --init-expert-location {path} "
                      "--ep-num-redundant-experts 16 --ep-dispatch-algorithm static", r.stdout)
        self.assertIn("layer offset 0", r.stdout)
        self.assertIn("leave out --enable-eplb", r.stdout)
        self.assertNotIn("was not checked", r.stdout)
        with open(path) as f:
            rows = json.load(f)["physical_to_logical_map"]
        self.assertEqual(len(rows), 4)
        self.assertTrue(all(len(row) == 80 for row in rows))

    def test_offset_comes_from_the_config(self):
        r, path = self.export("sglang", self.deepseek(), "d.json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("MoE layers 1-4 (layer offset 1)", r.stdout)
        with open(path) as f:
            rows = json.load(f)["physical_to_logical_map"]
        self.assertEqual(len(rows), 5)  # one per decoder layer
        self.assertEqual(rows[0], [p % 64 for p in range(80)])  # the dense layer's trivial row
        r, _ = self.export("sglang", self.deepseek(), "d2.json", "--layer-offset", 1)
        self.assertEqual(r.returncode, 0, r.stderr)
        r, path = self.export("sglang", self.deepseek(), "d3.json", "--layer-offset", 0)
        self.assert_fails(r, path, "--layer-offset 0", "decoder layer 1")

    def test_vllm_ascend_needs_num_redundant_experts(self):
        r, path = self.export("vllm-ascend", self.qwen3(), "a.json")
        self.assertEqual(r.returncode, 0, r.stderr)
        line = next(x for x in r.stdout.splitlines() if x.startswith("launch flags (vLLM-Ascend)"))
        blob = json.loads(line[line.index("'") + 1:line.rindex("'")])
        self.assertEqual(blob, {"eplb_config": {"expert_map_path": path, "num_redundant_experts": 16,
                                                "dynamic_eplb": False}})

    def test_trtllm_and_eplb_flags(self):
        r, path = self.export("trtllm", self.deepseek(), "t.yaml")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"--ep_size 8, and in the extra options YAML moe_config: {{load_balancer: {path}}} "
                      "(num_slots 80, layer keys from 1)", r.stdout)
        with open(path) as f:
            text = f.read()
        self.assertIn("num_slots: 80", text)
        r, path = self.export("eplb", self.qwen3(), "e.json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--eplb-config '{\"num_redundant_experts\": 16}'", r.stdout)

    def test_mismatches_write_nothing(self):
        cases = [
            (self.qwen3("q128.json", num_experts=128), "sglang", ("128 experts", "E=64")),
            (self.qwen3("q6.json", num_hidden_layers=6), "trtllm", ("6 MoE layers", "L=4")),
            # MoE layers 1, 3, 5, 7: four of them, but not consecutive.
            (self.qwen3("sparse.json", num_hidden_layers=8, decoder_sparse_step=2), "trtllm",
             ("MoE layer 1 is decoder layer 3", "trtllm export needs consecutive")),
            # A dense last layer: the SGLang map would have 4 rows for a 5-layer model.
            (self.qwen3("tail.json", num_hidden_layers=5, mlp_only_layers=[4]), "sglang",
             ("5 decoder layers", "4 rows")),
            (self.olmoe(), "sglang", ("OLMoE", "get_model_config_for_expert_location")),
            (self.config("bad.json", {"model_type": "olmoe"}), "sglang", ("bad.json",)),
        ]
        for i, (config, fmt, parts) in enumerate(cases):
            with self.subTest(config=os.path.basename(config), fmt=fmt):
                r, path = self.export(fmt, config, f"bad{i}.out")
                self.assert_fails(r, path, *parts)

    def test_interleaved_moe_layers_fine_where_only_moe_layers_count(self):
        sparse = self.qwen3("sparse2.json", num_hidden_layers=8, decoder_sparse_step=2)  # MoE layers 1, 3, 5, 7
        for fmt, out in (("vllm-ascend", "s.json"), ("eplb", "s-eplb.json")):
            r, path = self.export(fmt, sparse, out)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("MoE layers 1-7 (layer offset 1)", r.stdout)
            self.assertTrue(os.path.exists(path))

    def test_olmoe_fine_for_other_engines(self):
        r, _ = self.export("vllm-ascend", self.olmoe(), "o.json")
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_without_model_config_no_flags(self):
        r = run("export", self.plan, "--format", "sglang", "-o", os.path.join(self.dir, "plain.json"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("launch flags", r.stdout)


if __name__ == "__main__":
    unittest.main()
