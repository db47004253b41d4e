"""grace.recorder on CPU with stand-in modules named like the transformers classes (runs wherever PyTorch is
importable, e.g. Debian's python3-torch; skips cleanly otherwise). Covers the capture paths the device test
(transformers 5.17, where every router returns its selection) does not reach: older routers that return only
logits (softmax top-k, DeepSeek-V3 noaux_tc and DeepSeek-V2 group-limited selection computed by the recorder),
a (ids, weights) router output, padding removal and the NoMoEBlockError. References are NumPy
re-implementations written here."""

import os
import sys
import tempfile
import unittest

import numpy as np

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(SRC, "python"))

try:
    import torch
    from torch import nn
except ImportError:
    print("SKIP: PyTorch not importable")
    sys.exit(0)

from grace.recorder import NoMoEBlockError, RoutingRecorder  # noqa: E402
from grace.tracefile import read_trace  # noqa: E402

H = 16


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_topk(x, k):
    idx = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(x, idx, -1)


def ref_route(logits, family, k, n_group=None, topk_group=None, bias=None, norm=False, scale=1.0):
    x = logits.astype(np.float64)
    n, e = x.shape
    if family == "mixtral":
        i, w = np_topk(np_softmax(x), k)
        return i, w / w.sum(-1, keepdims=True)
    if family == "v2":
        p = np_softmax(x)
        g = p.reshape(n, n_group, -1).max(-1)
        keep_groups = np.argsort(-g, -1, kind="stable")[:, :topk_group]
        mask = np.zeros((n, n_group), bool)
        np.put_along_axis(mask, keep_groups, True, -1)
        p = np.where(np.repeat(mask, e // n_group, 1), p, 0.0)
        i, w = np_topk(p, k)
        return i, w * scale
    s = 1 / (1 + np.exp(-x))
    c = s + bias
    g = np.sort(c.reshape(n, n_group, -1), -1)[:, :, -2:].sum(-1)
    keep_groups = np.argsort(-g, -1, kind="stable")[:, :topk_group]
    mask = np.zeros((n, n_group), bool)
    np.put_along_axis(mask, keep_groups, True, -1)
    c = np.where(np.repeat(mask, e // n_group, 1), c, 0.0)
    i = np.argsort(-c, -1, kind="stable")[:, :k]
    w = np.take_along_axis(s, i, -1)
    if norm:
        w = w / w.sum(-1, keepdims=True)
    return i, w * scale


class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class MixtralSparseMoeBlock(nn.Module):  # transformers 4.x: gate is a Linear, experts a ModuleList
    def __init__(self, e=8, k=2):
        super().__init__()
        self.top_k, self.num_experts = k, e
        self.gate = nn.Linear(H, e, bias=False)
        self.experts = nn.ModuleList([nn.Identity() for _ in range(e)])

    def forward(self, h):
        logits = self.gate(h.reshape(-1, H))
        return h + 0 * logits.sum()


class DeepseekV3MoE(nn.Module):  # gate returns logits only; routing in the block, no fused experts module
    def __init__(self, e=16, k=4):
        super().__init__()
        self.top_k, self.n_routed_experts, self.n_group, self.topk_group = k, e, 4, 2
        self.norm_topk_prob, self.routed_scaling_factor = True, 2.5
        self.gate = nn.Linear(H, e, bias=False)
        self.gate.register_buffer("e_score_correction_bias", torch.randn(e) * 0.3)
        self.experts = nn.ModuleList([nn.Identity() for _ in range(e)])
        self.shared_experts = nn.Linear(H, H)  # not routed: never recorded

    def forward(self, h):
        return h + self.shared_experts(h) + 0 * self.gate(h.reshape(-1, H)).sum()


class DeepseekV2Moe(DeepseekV3MoE):
    def __init__(self):
        super().__init__(e=16, k=3)
        self.topk_method, self.routed_scaling_factor, self.norm_topk_prob = "group_limited_greedy", 1.5, False


class Legacy4xRouter(nn.Module):  # returns (ids, weights) like transformers 4.x DeepseekV3TopkRouter
    def __init__(self, e=8, k=2):
        super().__init__()
        self.lin, self.k = nn.Linear(H, e, bias=False), k

    def forward(self, h):
        p = self.lin(h.reshape(-1, H)).softmax(-1)
        w, i = p.topk(self.k, -1)
        return i, w


class OlmoeSparseMoeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Legacy4xRouter()
        self.num_experts, self.top_k = 8, 2

    def forward(self, h):
        self.gate(h)
        return h


class Layer(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


class Model(nn.Module):
    def __init__(self, blocks, config):
        super().__init__()
        self.embed = nn.Embedding(40, H)
        self.layers = nn.ModuleList([Layer(b) for b in blocks])
        self.config = config

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer.mlp(h)
        return h


def batches():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 40, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    ids2 = torch.randint(1, 40, (2, 4), generator=g)
    mask2 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    return [(ids, mask), (ids2, mask2)]


class RecorderMock(unittest.TestCase):
    def run_model(self, blocks, config):
        torch.manual_seed(0)
        model = Model(blocks, config).eval()
        logits = {id(b): [] for b in blocks}
        hooks = [b.gate.register_forward_hook(lambda m, a, o, b=b: logits[id(b)].append(
            (o if torch.is_tensor(o) else m.lin(a[0].reshape(-1, H))).detach().numpy())) for b in blocks]
        rec = RoutingRecorder(model)
        for ids, mask in batches():
            rec.record_batch(ids, mask)
        for hk in hooks:
            hk.remove()
        keep = np.concatenate([m.reshape(-1).numpy().astype(bool) for _, m in batches()])
        got, w = rec.trace()
        self.assertEqual(got.shape[0], int(keep.sum()))  # pad positions dropped
        return rec, got, w, {k: np.concatenate(v)[keep] for k, v in logits.items()}

    def test_mixtral_logits_path(self):
        blocks = [MixtralSparseMoeBlock(), MixtralSparseMoeBlock()]
        rec, got, w, lg = self.run_model(blocks, Cfg(num_experts_per_tok=2))
        self.assertEqual(rec.sources, ["logits", "logits"])
        for l, b in enumerate(blocks):
            i, rw = ref_route(lg[id(b)], "mixtral", 2)
            np.testing.assert_array_equal(got[:, l], i)
            np.testing.assert_allclose(w[:, l], rw, rtol=1e-5)

    def test_deepseek_v3_group_limited_from_logits(self):
        blocks = [DeepseekV3MoE(), DeepseekV3MoE()]
        rec, got, w, lg = self.run_model(blocks, Cfg(num_experts_per_tok=4, n_group=4, topk_group=2))
        for l, b in enumerate(blocks):
            i, rw = ref_route(lg[id(b)], "v3", 4, 4, 2, b.gate.e_score_correction_bias.numpy(), True, 2.5)
            np.testing.assert_array_equal(np.sort(got[:, l], 1), np.sort(i, 1))
            order = np.argsort(-rw, 1, kind="stable")  # recorded in rank order: descending weight
            np.testing.assert_array_equal(got[:, l], np.take_along_axis(i, order, 1))
            np.testing.assert_allclose(w[:, l], np.take_along_axis(rw, order, 1), rtol=1e-5)
            # group limit holds: the chosen experts span at most topk_group groups of 4
            self.assertTrue(max(len(set(r // 4)) for r in got[:, l]) <= 2)
        with tempfile.TemporaryDirectory() as d:
            meta = rec.save(os.path.join(d, "t.npy"), model_name="tiny-v3")
            ids, ww, m = read_trace(os.path.join(d, "t.npy"))
            np.testing.assert_array_equal(ids, got)
            self.assertEqual((m["num_experts"], m["top_k"], m["n_group"], m["topk_group"]), (16, 4, 4, 2))
            self.assertEqual(meta["moe_layers"], [0, 1])

    def test_deepseek_v2_group_limited_greedy_from_logits(self):
        blocks = [nn.Identity(), DeepseekV2Moe()]  # a dense first layer is not an MoE layer
        rec, got, w, lg = self.run_model(blocks[1:], Cfg(num_experts_per_tok=3, n_group=4, topk_group=2))
        i, rw = ref_route(lg[id(blocks[1])], "v2", 3, 4, 2, scale=1.5)
        np.testing.assert_array_equal(np.sort(got[:, 0], 1), np.sort(i, 1))

    def test_router_returning_ids_and_weights(self):
        blocks = [OlmoeSparseMoeBlock()]
        rec, got, w, lg = self.run_model(blocks, Cfg(num_experts_per_tok=2))
        self.assertEqual(rec.sources, ["router"])
        i, rw = np_topk(np_softmax(lg[id(blocks[0])].astype(np.float64)), 2)
        np.testing.assert_array_equal(got[:, 0], i)

    def test_dense_model_raises(self):
        with self.assertRaisesRegex(NoMoEBlockError, "no recognised MoE block"):
            RoutingRecorder(Model([nn.Identity()], Cfg()))
        self.assertTrue(issubclass(NoMoEBlockError, ValueError))


if __name__ == "__main__":
    unittest.main(verbosity=2)
