"""grace.hf.patch on CPU with stand-in modules that carry the attribute names and forward semantics of the
transformers MoE blocks (5.x: fused experts modules called as experts(hidden, top_k_index, top_k_weights), routers
returning (logits, weights, ids); 4.x: Linear gate + ModuleList of expert MLPs). transformers is not needed
(Debian's torch 1.13 is enough); skips cleanly without PyTorch.

Checked: the patched model's output against the stock model's, float32, relative error (Frobenius norm of the
difference over the norm of the stock output) <= 1e-5 - the same arithmetic in another order; the experts module of
each 5.x block is replaced and the router / shared experts are the original modules; unpatch restores the stock
modules; unsupported experts (GELU activation) are refused with nothing patched; a plan with the wrong layer or
expert count is refused. With grace.ep importable the buffers are real grace.ep.Buffers: a 1x1 plan made by
grace.plan (float32 within 1e-5; a bf16 model within 3e-2 of the stock bf16 model) and two processes over gloo with
a 1x2 plan (float32 within 1e-5). A reference buffer (below) covers the re-layout of a 2-rank plan's local slots
without grace.ep."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

SRC = os.environ.get("GRACE_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BUILD = os.environ.get("GRACE_BUILD_DIR", os.path.join(SRC, "build"))
sys.path.insert(0, os.path.join(SRC, "python"))
if os.path.isdir(os.path.join(BUILD, "python", "grace")):
    sys.path.insert(0, os.path.join(BUILD, "python"))

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    print("SKIP: PyTorch not importable")
    sys.exit(0)

import numpy as np  # noqa: E402

import grace  # noqa: E402
import grace.hf as ghf  # noqa: E402
from grace.recorder import route_from_logits  # noqa: E402

H, I_DIM = 16, 12
RTOL = 1e-5


class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------------------------------------------------------
# transformers 5.x stand-ins


class HF5:
    class FusedExperts(nn.Module):  # OlmoeExperts / Qwen2MoeExperts / MixtralExperts / DeepseekV3NaiveMoe
        def __init__(self, e, act=None):
            super().__init__()
            self.num_experts = e
            self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * I_DIM, H) * 0.3)
            self.down_proj = nn.Parameter(torch.randn(e, H, I_DIM) * 0.3)
            self.act_fn = act or nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(self.num_experts):
                pos, tok = torch.where(top_k_index.t() == e)
                if tok.numel() == 0:
                    continue
                gate, up = F.linear(hidden_states[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
            return out

    class TopKRouter(nn.Module):
        def __init__(self, e, k, norm):
            super().__init__()
            self.top_k, self.num_experts, self.norm_topk_prob = k, e, norm
            self.weight = nn.Parameter(torch.randn(e, H))

        def forward(self, hidden_states):
            logits = F.linear(hidden_states.reshape(-1, H), self.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            val, idx = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk_prob:
                val = val / val.sum(-1, keepdim=True)
            return logits, val.to(logits.dtype), idx

    class Mlp(nn.Module):  # Qwen2MoeMLP / DeepseekV3MLP (shared experts)
        def __init__(self, inter=I_DIM):
            super().__init__()
            self.gate_proj = nn.Linear(H, inter, bias=False)
            self.up_proj = nn.Linear(H, inter, bias=False)
            self.down_proj = nn.Linear(inter, H, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class OlmoeSparseMoeBlock(nn.Module):
        def __init__(self, e=8, k=2, norm=False, act=None):
            super().__init__()
            self.gate = HF5.TopKRouter(e, k, norm)
            self.experts = HF5.FusedExperts(e, act)

        def forward(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)
            _, w, idx = self.gate(x)
            return self.experts(x, idx, w).reshape(b, s, h)

    class Qwen3MoeSparseMoeBlock(OlmoeSparseMoeBlock):
        def __init__(self):
            super().__init__(e=16, k=4, norm=True)

    class MixtralSparseMoeBlock(OlmoeSparseMoeBlock):
        def __init__(self):
            super().__init__(e=8, k=2, norm=True)

    class Qwen2MoeSparseMoeBlock(OlmoeSparseMoeBlock):
        def __init__(self):
            super().__init__(e=8, k=2, norm=False)
            self.shared_expert = HF5.Mlp(2 * I_DIM)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

        def forward(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)
            _, w, idx = self.gate(x)
            out = self.experts(x, idx, w)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
            return out.reshape(b, s, h)

    class DeepseekV3TopkRouter(nn.Module):
        def __init__(self, e):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(e, H))
            self.register_buffer("e_score_correction_bias", torch.randn(e) * 0.3)

        def forward(self, hidden_states):
            return F.linear(hidden_states.reshape(-1, H).float(), self.weight.float())

    class DeepseekV3MoE(nn.Module):  # routing (noaux_tc, group-limited) in the block, then experts + shared
        def __init__(self, e=16, k=4):
            super().__init__()
            self.top_k, self.n_routed_experts, self.n_group, self.topk_group = k, e, 4, 2
            self.norm_topk_prob, self.routed_scaling_factor = True, 2.5
            self.gate = HF5.DeepseekV3TopkRouter(e)
            self.experts = HF5.FusedExperts(e)
            self.shared_experts = HF5.Mlp()

        def forward(self, hidden_states):
            residual, shape = hidden_states, hidden_states.shape
            logits = self.gate(hidden_states)
            idx, w = route_from_logits(logits, "deepseek_v3", self.top_k, norm_topk_prob=True, n_group=4,
                                       topk_group=2, correction_bias=self.gate.e_score_correction_bias,
                                       routed_scaling_factor=2.5)
            x = hidden_states.view(-1, shape[-1])
            out = self.experts(x, idx, w.to(x.dtype)).view(*shape)
            return out + self.shared_experts(residual)

    class GptOssTopKRouter(nn.Module):
        def __init__(self, e, k):
            super().__init__()
            self.top_k, self.num_experts = k, e
            self.weight = nn.Parameter(torch.randn(e, H))
            self.bias = nn.Parameter(torch.randn(e) * 0.1)

        def forward(self, hidden_states):
            logits = F.linear(hidden_states, self.weight, self.bias)
            val, idx = torch.topk(logits, self.top_k, dim=-1)
            return logits, torch.softmax(val, dim=1, dtype=val.dtype), idx

    class GptOssExperts(nn.Module):
        def __init__(self, e):
            super().__init__()
            self.num_experts = e
            self.gate_up_proj = nn.Parameter(torch.randn(e, H, 2 * I_DIM))
            self.gate_up_proj_bias = nn.Parameter(torch.randn(e, 2 * I_DIM))
            self.down_proj = nn.Parameter(torch.randn(e, I_DIM, H) * 0.3)
            self.down_proj_bias = nn.Parameter(torch.randn(e, H) * 0.3)
            self.alpha, self.limit = 1.702, 7.0

        def forward(self, hidden_states, router_indices=None, routing_weights=None):
            out = torch.zeros_like(hidden_states)
            for e in range(self.num_experts):
                pos, tok = torch.where(router_indices.t() == e)
                if tok.numel() == 0:
                    continue
                gu = hidden_states[tok] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
                gate, up = gu[..., ::2].clamp(max=self.limit), gu[..., 1::2].clamp(-self.limit, self.limit)
                y = ((up + 1) * gate * torch.sigmoid(gate * self.alpha)) @ self.down_proj[e] + self.down_proj_bias[e]
                out.index_add_(0, tok, y * routing_weights[tok, pos, None])
            return out

    class GptOssMLP(nn.Module):
        def __init__(self, e=8, k=2):
            super().__init__()
            self.router = HF5.GptOssTopKRouter(e, k)
            self.experts = HF5.GptOssExperts(e)

        def forward(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.reshape(-1, h)
            _, scores, idx = self.router(x)
            return self.experts(x, idx, scores).reshape(b, s, h), scores


# ------------------------------------------------------------------------------------------------------------------
# transformers 4.x stand-ins: Linear gate, ModuleList experts, routing in the block


class HF4:
    class MixtralBlockSparseTop2MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(H, I_DIM, bias=False)
            self.w2 = nn.Linear(I_DIM, H, bias=False)
            self.w3 = nn.Linear(H, I_DIM, bias=False)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.w2(self.act_fn(self.w1(x)) * self.w3(x))

    class MixtralSparseMoeBlock(nn.Module):
        def __init__(self, e=8, k=2):
            super().__init__()
            self.top_k, self.num_experts = k, e
            self.gate = nn.Linear(H, e, bias=False)
            self.experts = nn.ModuleList([HF4.MixtralBlockSparseTop2MLP() for _ in range(e)])

        def forward(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)
            logits = self.gate(x)
            w = F.softmax(logits, dim=1, dtype=torch.float)
            w, sel = torch.topk(w, self.top_k, dim=-1)
            w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
            out = torch.zeros_like(x)
            for e in range(self.num_experts):
                tok, pos = torch.where(sel == e)
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, pos, None])
            return out.reshape(b, s, h), logits

    class Qwen2MoeMLP(HF5.Mlp):
        pass

    class Qwen2MoeSparseMoeBlock(nn.Module):
        def __init__(self, e=8, k=3):
            super().__init__()
            self.num_experts, self.top_k, self.norm_topk_prob = e, k, False
            self.gate = nn.Linear(H, e, bias=False)
            self.experts = nn.ModuleList([HF4.Qwen2MoeMLP() for _ in range(e)])
            self.shared_expert = HF4.Qwen2MoeMLP(2 * I_DIM)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

        def forward(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)
            logits = self.gate(x)
            w, sel = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
            out = torch.zeros_like(x)
            for e in range(self.num_experts):
                tok, pos = torch.where(sel == e)
                out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, pos, None])
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
            return out.reshape(b, s, h), logits


class Layer(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


class Model(nn.Module):
    def __init__(self, blocks, config):
        super().__init__()
        self.embed = nn.Embedding(50, H)
        self.layers = nn.ModuleList([Layer(b) for b in blocks])
        self.config = config

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            out = layer.mlp(h)
            h = h + (out[0] if isinstance(out, tuple) else out)
        return h


# ------------------------------------------------------------------------------------------------------------------
# buffers


class ReferenceBuffer:
    """A grace.ep-shaped buffer in plain PyTorch for a plan's rank ``rank``: serves the selections whose expert's
    first holder in the plan is this rank (so the outputs of all ranks sum to the whole layer), no communication.
    Its ``moe`` reads the local slots exactly as grace.ep's contract says (row s of w13/w2 = gpu_experts[rank][s])."""

    def __init__(self, group, plan, layer, rank=0, **kwargs):
        ge = plan["layers"][layer]["gpu_experts"]
        e = plan["num_experts"]
        owner = {}
        for g, ids in enumerate(ge):
            for x in ids:
                owner.setdefault(x, g)
        self.slot = torch.full((e,), -1, dtype=torch.long)
        for s, x in enumerate(ge[rank]):
            if owner[x] == rank:
                self.slot[x] = s

    def dispatch(self, x, idx, w):
        topk = torch.where(idx >= 0, self.slot[idx.clamp_min(0)], torch.full_like(idx, -1)).to(torch.int32)
        return x, topk, torch.where(topk >= 0, w, torch.zeros_like(w)), None

    def combine(self, out, handle):
        return out.float()

    def experts(self, x, topk, w, w13, w2):
        out = torch.zeros(x.shape[0], x.shape[1])
        inter = w13.shape[1] // 2
        for r, j in zip(*torch.nonzero(topk >= 0, as_tuple=True)):
            s = int(topk[r, j])
            hh = w13[s].float() @ x[r].float()
            out[r] += w[r, j] * (w2[s].float() @ (F.silu(hh[:inter]) * hh[inter:]))
        return out

    def moe(self, x, idx, w, w13, w2):
        rx, rt, rw, hd = self.dispatch(x, idx, w)
        return self.combine(self.experts(rx, rt, rw, w13, w2), hd)


def identity_plan(num_layers, e):
    return {"num_experts": e, "layers": [{"gpu_experts": [list(range(e))]} for _ in range(num_layers)]}


def two_rank_plan(num_layers, e):
    """Rank 0 holds the odd experts plus a replica of expert 2, rank 1 the even ones: non-identity local slots."""
    odd, even = list(range(1, e, 2)), list(range(0, e, 2))
    return {"num_experts": e, "layers": [{"gpu_experts": [sorted(odd + [2]), even]} for _ in range(num_layers)]}


def have_ep():
    try:
        from grace import ep

        return hasattr(ep, "Buffer") and hasattr(grace, "plan")
    except ImportError:
        return False


def grace_plan_1x1(num_layers, e):
    rng = np.random.default_rng(3)
    ids = np.stack([np.stack([rng.choice(e, 2, replace=False) for _ in range(num_layers)]) for _ in range(256)])
    stats = grace.profile(ids.astype(np.int32), e, topology="1x1")
    return grace.plan(stats, "1x1")


FAMILIES_5 = {
    "olmoe": lambda: [HF5.OlmoeSparseMoeBlock(), HF5.OlmoeSparseMoeBlock()],
    "qwen2_moe": lambda: [HF5.Qwen2MoeSparseMoeBlock(), HF5.Qwen2MoeSparseMoeBlock()],
    "qwen3_moe": lambda: [HF5.Qwen3MoeSparseMoeBlock()],
    "mixtral": lambda: [HF5.MixtralSparseMoeBlock(), HF5.MixtralSparseMoeBlock()],
    "deepseek_v3": lambda: [HF5.DeepseekV3MoE(), HF5.DeepseekV3MoE()],
    "gpt_oss": lambda: [HF5.GptOssMLP(), HF5.GptOssMLP()],
}
FAMILIES_4 = {
    "mixtral4": lambda: [HF4.MixtralSparseMoeBlock(), HF4.MixtralSparseMoeBlock()],
    "qwen2_moe4": lambda: [HF4.Qwen2MoeSparseMoeBlock()],
}


def build(make, seed=0):
    torch.manual_seed(seed)
    blocks = make()
    return Model(blocks, Cfg(num_experts_per_tok=blocks[0].__dict__.get("top_k", 2))).eval(), len(blocks)


def num_experts(model):
    return ghf._expert_layout("", ghf.moe_blocks(model)[0][1].experts).num_experts


INPUT = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(9))


class HfPatch(unittest.TestCase):
    def check_family(self, make, plan_fn, factory):
        model, n = build(make)
        with torch.no_grad():
            ref = model(INPUT)
            ghf.patch(model, plan_fn(n, num_experts(model)), buffer_factory=factory)
            self.assertTrue(ghf.is_patched(model))
            got = model(INPUT)
        self.assertLessEqual(rel_err(got, ref), RTOL)
        return model, ref

    def test_5x_blocks_world_of_one_reference_buffer(self):
        for fam, make in FAMILIES_5.items():
            with self.subTest(fam):
                model, ref = self.check_family(make, identity_plan, ReferenceBuffer)
                for _, block, _ in ghf.moe_blocks(model):  # only the experts changed; router/shared are original
                    self.assertIsInstance(block.experts, ghf.GraceExperts)
                ghf.unpatch(model)
                self.assertFalse(ghf.is_patched(model))
                with torch.no_grad():
                    self.assertEqual(rel_err(model(INPUT), ref), 0.0)

    def test_4x_blocks_world_of_one_reference_buffer(self):
        for fam, make in FAMILIES_4.items():
            with self.subTest(fam):
                model, ref = self.check_family(make, identity_plan, ReferenceBuffer)
                self.assertTrue(all(isinstance(layer.mlp, ghf.GraceMoeBlock) for layer in model.layers))
                ghf.unpatch(model)
                self.assertFalse(any(isinstance(layer.mlp, ghf.GraceMoeBlock) for layer in model.layers))

    def test_two_rank_local_slots_sum_to_the_layer(self):
        # Rank r's patched model computes only the selections rank r owns; rank 0 + rank 1 = the stock output
        # (blocks without shared experts, which every rank would add).
        for fam in ("olmoe", "mixtral", "gpt_oss", "mixtral4"):
            make = {**FAMILIES_5, **FAMILIES_4}[fam]
            with self.subTest(fam):
                outs = []
                for rank in (0, 1):
                    model, n = build(make)
                    with torch.no_grad():
                        base = model.embed(INPUT)
                        block = ghf.moe_blocks(model)[0][1]
                        ref = block(base)
                        ref = ref[0] if isinstance(ref, tuple) else ref
                        old = ghf._group_rank
                        ghf._group_rank = lambda group, r=rank: r
                        try:
                            ghf.patch(model, two_rank_plan(n, num_experts(model)),
                                      buffer_factory=lambda g, p, l, r=rank, **kw: ReferenceBuffer(g, p, l, rank=r))
                        finally:
                            ghf._group_rank = old
                        out = model.layers[0].mlp(base)
                        outs.append(out[0] if isinstance(out, tuple) else out)
                self.assertLessEqual(rel_err(outs[0] + outs[1], ref), RTOL)
                self.assertGreater(rel_err(outs[0], ref), 0.1)  # each rank alone is only part of it

    @unittest.skipUnless(have_ep(), "grace.ep.Buffer not available (branch ep-cpu not merged)")
    def test_grace_ep_world_of_one(self):
        for fam, make in {**FAMILIES_5, **FAMILIES_4}.items():
            with self.subTest(fam):
                self.check_family(make, grace_plan_1x1, None)

    @unittest.skipUnless(have_ep(), "grace.ep.Buffer not available (branch ep-cpu not merged)")
    def test_grace_ep_bfloat16_model(self):
        # bf16 weights and activations (grace.ep's CPU backend takes bf16 weights, float32 activations): within
        # 3e-2 of the stock bf16 model (measured 0.002-0.012; the stock bf16 model itself is 0.003-0.036 from float32).
        for fam in ("olmoe", "qwen2_moe", "gpt_oss", "mixtral4"):
            with self.subTest(fam):
                model, n = build({**FAMILIES_5, **FAMILIES_4}[fam])
                model = model.to(torch.bfloat16)
                with torch.no_grad():
                    ref = model(INPUT)
                    ghf.patch(model, grace_plan_1x1(n, num_experts(model)))
                    got = model(INPUT)
                self.assertEqual(got.dtype, torch.bfloat16)
                self.assertLessEqual(rel_err(got, ref), 3e-2)

    @unittest.skipUnless(have_ep() and torch.distributed.is_available(), "grace.ep.Buffer not available")
    def test_grace_ep_two_ranks_over_gloo(self):
        # Two processes, a 1x2 plan: each rank feeds its own half of the batch; its output rows must equal the
        # stock model's rows (shared experts included: they are local, not exchanged).
        with tempfile.TemporaryDirectory() as d:
            init = "file://" + os.path.join(d, "rendezvous")
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), "2", init, d],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for r in range(2)]
            logs = [p.communicate(timeout=600)[0] for p in procs]
            for r, p in enumerate(procs):
                self.assertEqual(p.returncode, 0, logs[r][-3000:])
            for r in range(2):
                with open(os.path.join(d, f"rank{r}.json"), encoding="utf-8") as f:
                    errs = json.load(f)
                self.assertEqual(sorted(errs), sorted({**FAMILIES_5, **FAMILIES_4}))
                for fam, err in errs.items():
                    self.assertLessEqual(err, RTOL, f"rank {r} {fam}")

    def test_refusals(self):
        model, n = build(lambda: [HF5.OlmoeSparseMoeBlock(act=nn.GELU())])
        with self.assertRaisesRegex(ValueError, r"layers\.0\.mlp: the experts module FusedExperts is not SwiGLU"):
            ghf.patch(model, identity_plan(1, 8), buffer_factory=ReferenceBuffer)
        self.assertFalse(ghf.is_patched(model))
        self.assertIsInstance(model.layers[0].mlp.experts, HF5.FusedExperts)
        model, n = build(FAMILIES_5["olmoe"])
        with self.assertRaisesRegex(ValueError, "plan has 1 layers but Model has 2 MoE blocks"):
            ghf.patch(model, identity_plan(1, 8), buffer_factory=ReferenceBuffer)
        with self.assertRaisesRegex(ValueError, "plan is for 16 experts but layers.0.mlp has 8"):
            ghf.patch(model, identity_plan(2, 16), buffer_factory=ReferenceBuffer)
        # Malformed plans name the field (they raised a bare TypeError / int() ValueError), a folder says so.
        with self.assertRaisesRegex(ghf.PatchError, r"^plan: 'layers' must be a list, got int$"):
            ghf.patch(model, {"num_experts": 8, "layers": 5}, buffer_factory=ReferenceBuffer)
        with self.assertRaisesRegex(ghf.PatchError, r"^plan: 'num_experts' must be an integer, got 'x'$"):
            ghf.patch(model, dict(identity_plan(2, 8), num_experts="x"), buffer_factory=ReferenceBuffer)
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaisesRegex(ghf.PatchError, "is a folder, not a plan file"):
                ghf.patch(model, d, buffer_factory=ReferenceBuffer)
        self.assertFalse(ghf.is_patched(model))
        with self.assertRaisesRegex(ValueError, "no MoE block grace.hf supports"):
            ghf.patch(Model([], Cfg()), identity_plan(0, 8), buffer_factory=ReferenceBuffer)
        ghf.patch(model, identity_plan(2, 8), buffer_factory=ReferenceBuffer)
        with self.assertRaisesRegex(ValueError, "already patched"):
            ghf.patch(model, identity_plan(2, 8), buffer_factory=ReferenceBuffer)

    def test_identity_layout_shares_the_model_weights(self):
        model, n = build(FAMILIES_5["olmoe"])
        experts = ghf.moe_blocks(model)[0][1].experts
        ghf.patch(model, identity_plan(n, 8), buffer_factory=ReferenceBuffer)
        w13, w2 = ghf.moe_blocks(model)[0][1].experts._tensors
        self.assertEqual(w13.data_ptr(), experts.gate_up_proj.data_ptr())  # no copy for a 1x1 plan


def worker(rank, world, init, out_dir):
    """One rank of test_grace_ep_two_ranks_over_gloo: every family, patched with a grace.plan 1x2 plan."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    errs = {}
    for fam, make in {**FAMILIES_5, **FAMILIES_4}.items():
        model, n = build(make)
        rng = np.random.default_rng(3)
        e = num_experts(model)
        ids = np.stack([np.stack([rng.choice(e, 2, replace=False) for _ in range(n)]) for _ in range(256)])
        plan = grace.plan(grace.profile(ids.astype(np.int32), e, topology="1x2"), "1x2")
        mine = INPUT[rank::world]
        with torch.no_grad():
            ref = model(mine)
            ghf.patch(model, plan)
            errs[fam] = rel_err(model(mine), ref)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(errs, f)
    sys.stdout.flush()
    # Skip the process-group teardown: gloo aborts ("terminate called without an active exception") when its peer
    # has already exited; tests/python/test_ep.py's workers end the same way.
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
        sys.exit(0)
    unittest.main(verbosity=2)
