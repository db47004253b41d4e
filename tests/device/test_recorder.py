"""Device test of grace.recorder (not run by CI: needs torch + transformers; skips cleanly without them).

For each supported architecture a tiny model is built from a config with random weights (no downloads), run
over padded batches (right and left padding) while the recorder and this test's own hooks are attached. The
test then checks, per MoE layer and batch:
  * the recorded token count equals the number of non-pad positions;
  * the recorded ids equal the routing recomputed here, independently, from the router logits the gate
    produced (softmax top-k / DeepSeek group-limited selection), as ordered lists for the softmax routers and
    as sets for DeepSeek (whose top-k is unsorted), and the recorded weights match;
  * the recorded ids equal the ids the block actually handed its experts module;
and that a dense model raises NoMoEBlockError and the text path (tokenizer + strings) records every non-pad
token. Usage: PYTHONPATH=python python3 tests/device/test_recorder.py [--out results.md]
"""

import os
import sys
import tempfile
import time
import traceback

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
except ImportError as e:  # CI: no torch/transformers
    print(f"SKIP: {e}")
    sys.exit(0)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from grace.recorder import NoMoEBlockError, RoutingRecorder, record_trace  # noqa: E402
from grace.tracefile import read_trace  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def configs():
    t = transformers
    return [
        ("olmoe", "OlmoeForCausalLM", lambda: t.OlmoeConfig(**COMMON, num_hidden_layers=3, num_experts=8,
                                                           num_experts_per_tok=2, norm_topk_prob=False)),
        ("qwen2_moe", "Qwen2MoeForCausalLM", lambda: t.Qwen2MoeConfig(
            **COMMON, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
        ("qwen3_moe", "Qwen3MoeForCausalLM", lambda: t.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=2, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
            head_dim=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)),
        ("mixtral", "MixtralForCausalLM", lambda: t.MixtralConfig(**COMMON, num_hidden_layers=2,
                                                                 num_local_experts=8, num_experts_per_tok=2)),
        ("deepseek_v2_greedy", "DeepseekV2ForCausalLM", lambda: t.DeepseekV2Config(
            **COMMON, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=None,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, topk_method="greedy")),
        ("deepseek_v2_group", "DeepseekV2ForCausalLM", lambda: t.DeepseekV2Config(
            **COMMON, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=3, moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=None,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, topk_method="group_limited_greedy",
            n_group=4, topk_group=2)),
        ("deepseek_v3", "DeepseekV3ForCausalLM", lambda: t.DeepseekV3Config(
            **COMMON, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=4, moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=None,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5)),
    ]


def reference_route(logits, name, cfg, bias):
    """This test's own routing rule per architecture (independent of grace.recorder)."""
    x = logits.float()
    n, e = x.shape
    k = cfg.num_experts_per_tok
    if name.startswith(("olmoe", "qwen", "mixtral")):
        p = x.softmax(-1)
        w, i = p.topk(k, -1)
        if name == "mixtral" or getattr(cfg, "norm_topk_prob", False):
            w = w / w.sum(-1, keepdim=True)
        return i, w
    if name.startswith("deepseek_v2"):
        p = x.softmax(-1)
        if cfg.topk_method == "group_limited_greedy":
            g = p.view(n, cfg.n_group, -1).max(-1).values
            keep = torch.zeros_like(g).scatter_(1, g.topk(cfg.topk_group, -1).indices, 1).bool()
            p = torch.where(keep.repeat_interleave(e // cfg.n_group, 1), p, torch.zeros_like(p))
        w, i = p.topk(k, -1)
        return i, w * cfg.routed_scaling_factor
    s = x.sigmoid()
    c = s + bias.float()
    g = c.view(n, cfg.n_group, -1).topk(2, -1).values.sum(-1)
    keep = torch.zeros_like(g).scatter_(1, g.topk(cfg.topk_group, -1).indices, 1).bool()
    c = torch.where(keep.repeat_interleave(e // cfg.n_group, 1), c, torch.zeros_like(c))
    i = c.topk(k, -1).indices
    w = s.gather(1, i)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return i, w * cfg.routed_scaling_factor


class Spy:
    """The test's own hooks: router logits (from the gate, or gate.weight applied to the block input when the
    block does not call its gate) and the ids handed to the experts module."""

    def __init__(self, model):
        self.blocks = [m for m in model.modules() if type(m).__name__ in
                       ("OlmoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                        "MixtralSparseMoeBlock", "DeepseekV2Moe", "DeepseekV2MoE", "DeepseekV3MoE")]
        self.logits = {id(b): [] for b in self.blocks}
        self.expert_ids = {id(b): [] for b in self.blocks}
        self.handles = []
        for b in self.blocks:
            st = {}
            def pre(mod, args, st=st):
                st["h"] = args[0]
                st["gate"] = None
            def gate_hook(mod, a, out, st=st):
                st["gate"] = out[0] if isinstance(out, tuple) else out
            def exp_hook(mod, args, kwargs, b=b):
                idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
                self.expert_ids[id(b)].append(idx.reshape(-1, idx.shape[-1]).detach().cpu())
            def post(mod, a, o, b=b, st=st):
                lg = st["gate"]
                if lg is None:
                    h = st["h"]
                    lg = F.linear(h.float().reshape(-1, h.shape[-1]), mod.gate.weight.float())
                self.logits[id(b)].append(lg.reshape(-1, lg.shape[-1]).detach())
            self.handles += [b.register_forward_pre_hook(pre), b.gate.register_forward_hook(gate_hook),
                             b.register_forward_hook(post)]
            if isinstance(b.experts, torch.nn.Module) and not isinstance(b.experts, torch.nn.ModuleList):
                self.handles.append(b.experts.register_forward_pre_hook(exp_hook, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def make_batches(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths, left in (([7, 3, 5], False), ([4, 9], True), ([6, 6, 2, 1], False)):
        s = max(lengths)
        ids = torch.randint(3, vocab, (len(lengths), s), generator=g)
        mask = torch.zeros(len(lengths), s, dtype=torch.long)
        for r, n in enumerate(lengths):
            if left:
                mask[r, s - n:] = 1
            else:
                mask[r, :n] = 1
        ids[mask == 0] = 0
        out.append((ids, mask))
    return out


def check_arch(name, cls_name, make_cfg):
    torch.manual_seed(0)
    cfg = make_cfg()
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(cfg).to(DEV).eval()
    with torch.no_grad():
        for n_, p in model.named_parameters():
            if n_.endswith("gate.weight") and "gate_proj" not in n_ and p.dim() == 2 and p.shape[0] > 1:
                p.normal_(0.0, 0.5)  # decisive routing
        for n_, buf in model.named_buffers():
            if n_.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)  # make the correction bias change the choice
    spy = Spy(model)
    rec = RoutingRecorder(model)
    batches = make_batches(cfg.vocab_size, 1)
    for ids, mask in batches:
        rec.record_batch(ids, mask)
    ids, weights = rec.trace()
    rec.remove()
    spy.remove()
    sorted_sets = name.startswith("deepseek")
    n_real = int(sum(m.sum() for _, m in batches))
    assert ids.shape == (n_real, len(spy.blocks), cfg.num_experts_per_tok), (ids.shape, n_real)
    mismatches = 0
    diffs_vs_bias_free = 0
    for l, b in enumerate(spy.blocks):
        ref_i, ref_w, exp_i = [], [], []
        for bi, (_, mask) in enumerate(batches):
            keep = mask.reshape(-1).bool()
            lg = spy.logits[id(b)][bi]
            bias = getattr(b.gate, "e_score_correction_bias", None)
            i, w = reference_route(lg, name, cfg, bias)
            ref_i.append(i.cpu()[keep])
            ref_w.append(w.float().cpu()[keep])
            if spy.expert_ids[id(b)]:
                exp_i.append(spy.expert_ids[id(b)][bi][keep])
            if name == "deepseek_v3":  # how often the bias + groups change the plain top-k
                plain = lg.float().sigmoid().topk(cfg.num_experts_per_tok, -1).indices.cpu()[keep]
                diffs_vs_bias_free += int((plain.sort(-1).values != i.cpu()[keep].sort(-1).values).any(-1).sum())
        ref_i = torch.cat(ref_i).numpy()
        ref_w = torch.cat(ref_w).numpy()
        got_i = ids[:, l, :]
        got_w = weights[:, l, :]
        if sorted_sets:
            o_ref = np.argsort(ref_i, 1)
            o_got = np.argsort(got_i, 1)
            ri, rw = np.take_along_axis(ref_i, o_ref, 1), np.take_along_axis(ref_w, o_ref, 1)
            gi, gw = np.take_along_axis(got_i, o_got, 1), np.take_along_axis(got_w, o_got, 1)
        else:
            ri, rw, gi, gw = ref_i, ref_w, got_i, got_w
        bad = (ri != gi).any(1)
        mismatches += int(bad.sum())
        assert not bad.any(), f"{name} layer {l}: {int(bad.sum())} tokens differ, first {np.argmax(bad)}: " \
                              f"recorded {got_i[np.argmax(bad)]} vs reference {ref_i[np.argmax(bad)]}"
        assert np.allclose(gw, rw, atol=1e-5, rtol=1e-4), f"{name} layer {l}: weights differ"
        if exp_i:
            e = torch.cat(exp_i).numpy()
            assert (np.sort(e, 1) == np.sort(got_i, 1)).all(), f"{name} layer {l}: experts got other ids"
        # rank order: descending weight
        assert (np.diff(got_w, axis=1) <= 1e-7).all(), f"{name} layer {l}: ids not in rank order"
    return dict(arch=name, cls=cls_name, tokens=n_real, padded=int(sum(m.numel() for _, m in batches)),
                layers=len(spy.blocks), moe_layers=rec.moe_layers, k=cfg.num_experts_per_tok,
                experts=rec.num_experts(), source=sorted(set(rec.sources)), mismatches=mismatches,
                bias_changed=diffs_vs_bias_free)


def check_dense():
    cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=2)
    model = transformers.LlamaForCausalLM(cfg)
    try:
        RoutingRecorder(model)
    except NoMoEBlockError as e:
        return str(e)
    raise AssertionError("a dense model did not raise NoMoEBlockError")


def check_texts(tmp):
    from tokenizers import Tokenizer, models, pre_tokenizers
    texts = ["the quick brown fox jumps over the lazy dog", "experts route tokens",
             "grace groups experts by affinity and replicates the hot ones", "",
             "a b c", "mixture of experts inference on many gpus needs balanced load"]
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                               eos_token="[EOS]")
    cfg = transformers.OlmoeConfig(**dict(COMMON, vocab_size=len(vocab)), num_hidden_layers=2, num_experts=8,
                                   num_experts_per_tok=2)
    cfg._attn_implementation = "eager"
    model = transformers.OlmoeForCausalLM(cfg).to(DEV).eval()
    path = os.path.join(tmp, "olmoe_text.npy")
    meta = record_trace(model, texts, path, tokenizer=tok, model_name="tiny-olmoe", dataset="six-sentences",
                        batch_size=4)
    ids, w, m = read_trace(path)
    expected = sum(len(t.split()) for t in texts if t.strip())
    assert ids.shape == (expected, 2, 2), (ids.shape, expected)
    assert m["format"] == "grace.trace/v1" and m["num_experts"] == 8 and m["top_k"] == 2 and m["num_layers"] == 2
    assert m["weights"] == "olmoe_text.weights.npy" and w.shape == ids.shape
    assert m == meta
    return expected


def main():
    out = None
    if "--out" in sys.argv:
        out = sys.argv[sys.argv.index("--out") + 1]
    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}, device {DEV}"
             + (f" ({torch.cuda.get_device_name(0)})" if DEV == "cuda" else ""), "",
             "| architecture | model class | MoE layers (decoder idx) | E | k | tokens recorded / padded positions "
             "| ids from | mismatches vs reference | result |", "|---|---|---|---|---|---|---|---|---|"]
    failures = 0
    t0 = time.time()
    for name, cls_name, make in configs():
        try:
            r = check_arch(name, cls_name, make)
            extra = f" (bias+groups changed {r['bias_changed']} token selections)" if name == "deepseek_v3" else ""
            lines.append(f"| {name} | {cls_name} | {r['layers']} ({r['moe_layers']}) | {r['experts']} | {r['k']} | "
                         f"{r['tokens']} / {r['padded']} | {', '.join(r['source'])} | {r['mismatches']}{extra} | PASS |")
        except Exception as e:  # report every architecture, then fail
            failures += 1
            traceback.print_exc()
            lines.append(f"| {name} | {cls_name} | | | | | | | FAIL: {type(e).__name__}: {str(e)[:160]} |")
    try:
        msg = check_dense()
        lines += ["", f"dense LlamaForCausalLM -> NoMoEBlockError: PASS ({msg[:100]}...)"]
    except Exception as e:
        failures += 1
        lines += ["", f"dense model check: FAIL {e}"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            n = check_texts(tmp)
            lines.append(f"text path (WordLevel tokenizer, 5 non-empty strings, batch 4, padding): {n} tokens "
                         "recorded = non-pad tokens; trace + metadata + weights read back: PASS")
        except Exception as e:
            failures += 1
            traceback.print_exc()
            lines.append(f"text path: FAIL {type(e).__name__}: {e}")
    lines.append(f"\n{failures} failure(s); {time.time() - t0:.1f} s")
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
