"""bench/torch/whole_model.py without a GPU or transformers: --dry-run (argument checks, the inline configs give the
published total parameter counts, layer trimming is reported), and the run path (plan from a recorded trace,
stock + patched greedy decode, comparison, JSON + markdown) on CPU with a tiny stand-in causal LM built from
test_hf_patch's transformers-shaped MoE blocks and its reference buffer."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(HERE, "..", ".."))
SCRIPT = os.path.join(SRC, "bench", "torch", "whole_model.py")
sys.path.insert(0, os.path.join(SRC, "bench", "torch"))

import whole_model  # noqa: E402

# Published total parameter counts (model cards): the inline configs must reproduce them within 2 %.
PUBLISHED_PARAMS = {"olmoe": 6.92e9, "qwen2_moe": 14.3e9, "qwen3_moe": 30.5e9, "mixtral": 46.7e9,
                    "deepseek_v2_lite": 15.7e9, "gpt_oss": 20.9e9}


def load(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)


class DryRun(unittest.TestCase):
    def test_configs_and_trimming(self):
        with tempfile.TemporaryDirectory() as d:
            r = run("--dry-run", "--out", d, "--weight-budget-gib", "1000")
            self.assertEqual(r.returncode, 0, r.stderr)
            full = json.loads(load(os.path.join(d, "whole_model_dry_run.json")))["architectures"]
            self.assertEqual(sorted(full), sorted(PUBLISHED_PARAMS))
            for arch, n in PUBLISHED_PARAMS.items():
                self.assertFalse(full[arch]["trimmed"])
                self.assertAlmostEqual(full[arch]["params"] / n, 1.0, delta=0.02, msg=arch)
            r = run("--dry-run", "--out", d, "--weight-budget-gib", "32")
            self.assertEqual(r.returncode, 0, r.stderr)
            trimmed = json.loads(load(os.path.join(d, "whole_model_dry_run.json")))["architectures"]
            mix = trimmed["mixtral"]
            self.assertTrue(mix["trimmed"])
            self.assertLess(mix["used_layers"], 32)
            self.assertLessEqual(mix["weight_gib"], 32)
            self.assertIn("> --weight-budget-gib 32", mix["trim_reason"])
            self.assertIn("mixtral", r.stdout)
            self.assertIn("trimmed", r.stdout)
            self.assertEqual(len(trimmed["gpt_oss"]["config"]["layer_types"]), trimmed["gpt_oss"]["used_layers"])

    def test_bad_arguments(self):
        for args, msg in ((["--archs", "llama"], "--archs: unknown llama"),
                          (["--shapes", "256x128"], "--shapes: '256x128' is not BATCHxPROMPT+DECODE"),
                          (["--shapes", "0x8+2"], "needs positive sizes"),
                          (["--weight-budget-gib", "0"], "--weight-budget-gib: 0.0 must be positive")):
            r = run("--dry-run", "--out", "/nonexistent/never", *args)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(msg, r.stderr)
            self.assertEqual(len(r.stderr.strip().splitlines()[-1:]), 1)


try:
    import torch
    from torch import nn

    sys.path.insert(0, HERE)
    import test_hf_patch as hfmock  # noqa: E402

    import grace  # noqa: E402

    HAVE = hasattr(grace, "plan")
except ImportError:
    HAVE = False


if HAVE:
    class Out:
        def __init__(self, logits, past):
            self.logits, self.past_key_values = logits, past

    class TinyCausalLM(nn.Module):
        """Embedding -> MoE blocks (residual) -> lm_head; no attention, so the KV cache is a step counter."""

        def __init__(self, blocks, vocab):
            super().__init__()
            self.embed = nn.Embedding(vocab, hfmock.H)
            self.layers = nn.ModuleList([hfmock.Layer(b) for b in blocks])
            self.lm_head = nn.Linear(hfmock.H, vocab, bias=False)
            self.config = hfmock.Cfg(num_experts_per_tok=2)

        def forward(self, input_ids, attention_mask=None, use_cache=False, past_key_values=None, logits_to_keep=0):
            h = self.embed(input_ids)
            for layer in self.layers:
                out = layer.mlp(h)
                h = h + (out[0] if isinstance(out, tuple) else out)
            logits = self.lm_head(h)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
            return Out(logits, (past_key_values or 0) + input_ids.shape[1])


@unittest.skipUnless(HAVE, "needs PyTorch and the grace extension")
class MockRun(unittest.TestCase):
    def test_run_arch_on_cpu(self):
        self.run_arch({"buffer_factory": hfmock.ReferenceBuffer})

    @unittest.skipUnless(HAVE and hfmock.have_ep(), "grace.ep.Buffer not available")
    def test_run_arch_on_cpu_with_grace_ep(self):
        self.run_arch(None)

    def run_arch(self, patch_kwargs):
        vocab = 40
        info = dict(source="tiny", model_type="olmoe", published_layers=2, used_layers=2, trimmed=False,
                    trim_reason="", params=0, weight_gib=0.0,
                    config=dict(vocab_size=vocab, num_experts=8, num_experts_per_tok=2))

        def build(info, device, dtype):
            torch.manual_seed(0)
            return TinyCausalLM([hfmock.HF5.OlmoeSparseMoeBlock(), hfmock.HF5.OlmoeSparseMoeBlock()], vocab).eval()

        args = whole_model.argparse.Namespace(device="cpu", dtype="float32", repeats=2)
        rec = whole_model.run_arch("olmoe", info, [(4, 6, 3), (3, 5, 4)], args, build=build,
                                   patch_kwargs=patch_kwargs)
        self.assertNotIn("grace_error", rec, rec.get("grace_traceback"))
        self.assertEqual(rec["moe_blocks"], 2)
        self.assertTrue(rec["trace"].startswith("recorded: 512 tokens"), rec["trace"])
        for name, (b, d) in {"4x6+3": (4, 3), "3x5+4": (3, 4)}.items():
            g = rec["shapes"][name]["grace"]
            self.assertEqual((g["sequences"], g["steps"]), (b, d))
            self.assertEqual(g["identical_sequences"], b)  # float32 reference buffer: same tokens
            self.assertEqual(g["first_divergence_min"], d)
            self.assertLess(g["prefill_logits_rel_err"], 1e-2)  # bf16 storage of the prefill logits
            self.assertLess(g["step_logits_rel_err_max"], 1e-5)
            self.assertGreater(rec["shapes"][name]["stock"]["prefill_tok_s"], 0)
        with tempfile.TemporaryDirectory() as d:
            report = dict(environment="cpu test", shapes=["4x6+3", "3x5+4"], architectures=[rec])
            whole_model.write_outputs(d, report)
            md = load(os.path.join(d, "whole_model.md"))
            self.assertIn("| olmoe (tiny) | 2 / 2 | OlmoeSparseMoeBlock | 4x6+3 |", md)
            self.assertIn("4 / 4 | 3 / 3.0 of 3", md)
            self.assertEqual(json.loads(load(os.path.join(d, "whole_model.json")))["architectures"][0]["arch"], "olmoe")


if __name__ == "__main__":
    unittest.main(verbosity=2)
