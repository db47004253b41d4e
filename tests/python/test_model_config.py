#!/usr/bin/env python3
"""`--model-config` (a Hugging Face config.json) and the model presets on `grace eval`, `compare` and `run`.

A generated OLMoE trace cut to 4 layers (64 experts, top-8) is priced with shapes from config.json files the test
writes, and with presets by name: the report carries the config's H and I, bytes scale with H, and a model whose
experts or MoE layers differ from the trace's is a one-line error naming both values.
"""
import json
import os
import subprocess
import tempfile
import unittest

GRACE = os.environ.get("GRACE_BIN", "build/tools/grace/grace")
ELEM = 2  # every hardware preset's element_size


def run(*args):
    return subprocess.run([GRACE, *map(str, args)], capture_output=True, text=True)


class ModelConfigTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.trace = os.path.join(cls.dir, "t.npy")
        cls.plan = os.path.join(cls.dir, "plan.json")
        for args in (["gen", "--preset", "olmoe", "--tokens", 3000, "--layers", 4, "--seed", 3, "-o", cls.trace],
                     ["plan", "--trace", cls.trace, "--topology", "2x2", "--method", "grace", "-q", "-o", cls.plan]):
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

    def olmoe_like(self, name="olmoe.json", **over):
        fields = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
                  "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 4,
                  "torch_dtype": "float32", "vocab_size": 50304}
        fields.update(over)
        return self.config(name, fields)

    def eval(self, out, *extra):
        return run("eval", "--trace", self.trace, "--plan", self.plan, "--comm", "flat", "-o",
                   os.path.join(self.dir, out), *extra)

    def report(self, out):
        with open(os.path.join(self.dir, out + ".json")) as f:
            return json.load(f)

    def assert_one_line_error(self, r, *parts):
        self.assertNotEqual(r.returncode, 0)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertTrue(lines[0].startswith("grace: error: "), lines[0])
        for p in parts:
            self.assertIn(p, lines[0])

    def test_eval_with_a_config_equals_eval_with_the_same_sizes_by_hand(self):
        cfg = self.olmoe_like()
        r = self.eval("cfg", "--model-config", cfg)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.eval("hand", "--hidden", 2048, "--intermediate", 1024)
        self.assertEqual(r.returncode, 0, r.stderr)
        got, want = self.report("cfg"), self.report("hand")
        self.assertEqual((got["hidden"], got["intermediate"], got["model"]), (2048, 1024, cfg))
        self.assertEqual(got["total"], want["total"])

    def test_each_architecture_prices_its_own_hidden_size(self):
        # DeepSeek-V2-like: layer 0 dense, so 5 decoder layers give the trace's 4 MoE layers; experts in
        # n_routed_experts, expert size in moe_intermediate_size (not the dense intermediate_size).
        ds = self.config("ds.json", {
            "model_type": "deepseek_v2", "hidden_size": 5120, "intermediate_size": 12288,
            "moe_intermediate_size": 1536, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
            "num_hidden_layers": 5, "first_k_dense_replace": 1, "moe_layer_freq": 1, "torch_dtype": "bfloat16"})
        # Qwen2-MoE-like with a dense layer listed in mlp_only_layers.
        qw = self.config("qw.json", {
            "model_type": "qwen2_moe", "hidden_size": 3584, "intermediate_size": 18944,
            "moe_intermediate_size": 2560, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 5,
            "decoder_sparse_step": 1, "mlp_only_layers": [2], "shared_expert_intermediate_size": 20480})
        # GPT-OSS-like, top-k under its openai name only.
        go = self.config("go.json", {
            "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 64,
            "experts_per_token": 4, "num_hidden_layers": 4})
        r = self.eval("base", "--model-config", self.olmoe_like())
        self.assertEqual(r.returncode, 0, r.stderr)
        base = self.report("base")
        copies = base["total"]["cross_node_copies"]
        self.assertGreater(copies, 0)
        for cfg, H, I in [(ds, 5120, 1536), (qw, 3584, 2560), (go, 2880, 2880)]:
            out = os.path.basename(cfg) + ".rep"
            r = self.eval(out, "--model-config", cfg)
            self.assertEqual(r.returncode, 0, r.stderr)
            rep = self.report(out)
            self.assertEqual((rep["hidden"], rep["intermediate"]), (H, I))
            # Routing does not depend on the shape; bytes are copies x H x element size.
            self.assertEqual(rep["total"]["cross_node_copies"], copies)
            self.assertEqual(rep["total"]["cross_node_bytes"], copies * H * ELEM)

    def test_experts_or_layers_that_differ_from_the_trace_are_errors(self):
        r = self.eval("x1", "--model-config", self.olmoe_like("e32.json", num_experts=32))
        self.assert_one_line_error(r, "has 32 routed experts but the trace has 64", "e32.json")
        r = self.eval("x2", "--model-config", self.olmoe_like("l16.json", num_hidden_layers=16))
        self.assert_one_line_error(r, "has 16 MoE layers but the trace has 4")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "x1.json")))
        # A preset named by --model is checked the same way (olmoe has 16 MoE layers, the trace 4).
        r = self.eval("x3", "--model", "olmoe")
        self.assert_one_line_error(r, "model olmoe has 16 MoE layers but the trace has 4")
        r = self.eval("x4", "--model", "gpt-oss-120b")
        self.assert_one_line_error(r, "model gpt-oss-120b has 128 routed experts but the trace has 64")
        # --hidden that contradicts the config.
        r = self.eval("x5", "--model-config", self.olmoe_like(), "--hidden", 4096)
        self.assert_one_line_error(r, "has hidden size 2048 but the hardware file (or --hidden) gives 4096")

    def test_bad_config_files_are_one_line_errors(self):
        cases = [
            (self.olmoe_like("frac.json", hidden_size=2048.5), 'field "hidden_size" must be an integer'),
            (self.olmoe_like("big.json", num_experts=5000000000), 'field "num_experts" is 5000000000, outside'),
            (self.olmoe_like("topk.json", num_experts_per_tok=65), "num_experts_per_tok 65 exceeds the 64"),
            (self.config("miss.json", {"model_type": "mixtral", "hidden_size": 8}),
             'missing field "intermediate_size" (model_type mixtral)'),
            (self.config("llama.json", {"model_type": "llama"}), "model_type 'llama' is not a supported MoE"),
            (os.path.join(self.dir, "absent.json"), "absent.json"),
        ]
        for path, part in cases:
            with self.subTest(path=path):
                self.assert_one_line_error(self.eval("bad", "--model-config", path), part, os.path.basename(path))
        with open(os.path.join(self.dir, "broken.json"), "w") as f:
            f.write('{"model_type": ')
        self.assert_one_line_error(self.eval("bad", "--model-config", os.path.join(self.dir, "broken.json")),
                                   "not valid JSON")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "bad.json")))

    def test_every_preset_name_resolves_from_the_trace_metadata(self):
        # A trace whose metadata names a new preset gets that preset's H and I (E and L unchecked there).
        with open(os.path.join(self.dir, "t.json")) as f:
            meta = json.load(f)
        for model, H, I in [("deepseek-v3", 7168, 2048), ("deepseek-r1", 7168, 2048), ("gpt-oss-20b", 2880, 2880),
                            ("qwen2-57b-a14b", 3584, 2560), ("mixtral-8x22b", 6144, 16384)]:
            with self.subTest(model=model):
                # A copy of the trace whose metadata names `model`.
                folder = os.path.join(self.dir, "meta-" + model)
                os.makedirs(folder, exist_ok=True)
                for name in os.listdir(self.dir):
                    if name.startswith("t.") and name.endswith(".npy"):
                        os.symlink(os.path.join(self.dir, name), os.path.join(folder, name))
                with open(os.path.join(folder, "t.json"), "w") as f:
                    json.dump(dict(meta, model=model), f)
                r = run("eval", "--trace", os.path.join(folder, "t.npy"), "--plan", self.plan, "--comm", "flat",
                        "-o", os.path.join(self.dir, "meta"))
                self.assertEqual(r.returncode, 0, r.stderr)
                rep = self.report("meta")
                self.assertEqual((rep["model"], rep["hidden"], rep["intermediate"]), (model, H, I))

    def test_compare_takes_the_config_and_checks_it(self):
        out = os.path.join(self.dir, "cmp")
        r = run("compare", "--trace", self.trace, "--topology", "2x2", "--model-config",
                self.olmoe_like("cmp.json", hidden_size=4096), "-o", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(os.path.join(out, "compare.json")) as f:
            entries = json.load(f)["entries"]
        self.assertTrue(entries)
        for e in entries:  # priced at the config's H = 4096
            self.assertEqual(e["total"]["cross_node_bytes"], e["total"]["cross_node_copies"] * 4096 * ELEM, e["name"])
        r = run("compare", "--trace", self.trace, "--topology", "2x2", "--model-config",
                self.olmoe_like("cmp32.json", num_experts=32), "-o", out + "2")
        self.assert_one_line_error(r, "has 32 routed experts but the trace has 64")
        self.assertFalse(os.path.exists(out + "2"))

    def test_run_takes_the_config_shape(self):
        plan1 = os.path.join(self.dir, "plan1.json")
        r = run("plan", "--trace", self.trace, "--topology", "1x1", "--method", "grace", "-q", "-o", plan1)
        self.assertEqual(r.returncode, 0, r.stderr)
        tiny = self.olmoe_like("tiny.json", hidden_size=16, intermediate_size=8)
        out = os.path.join(self.dir, "run.json")
        r = run("run", "--plan", plan1, "--trace", self.trace, "--backend", "local", "--model-config", tiny,
                "--layers", 1, "-o", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(out) as f:
            self.assertEqual(json.load(f)["hidden"], 16)
        r = run("run", "--plan", plan1, "--trace", self.trace, "--backend", "local", "--model-config",
                self.olmoe_like("run16.json", num_hidden_layers=16), "-o", out + "2")
        self.assert_one_line_error(r, "has 16 MoE layers but the trace has 4")


if __name__ == "__main__":
    unittest.main()
