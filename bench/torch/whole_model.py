#!/usr/bin/env python3
"""Whole-model check of grace.hf on one GPU: each supported MoE architecture, built from its published config.json
shape with random weights (no checkpoint, no network), bf16 on cuda, runs prefill + greedy decode twice - with the
stock transformers MoE blocks and after grace.hf.patch (routed experts through grace.ep, topology 1x1, plan made
by grace from a trace recorded on the stock model, or a generated one where the recorder does not know the block).

Reports per architecture and batch shape (BATCH x PROMPT + DECODE steps): greedy tokens identical for how many
steps (first divergence step per sequence), relative error of the prefill logits (all sequences, last position)
and of each step's logits while a sequence's history is still identical (first 8 sequences), tokens/s of prefill
and decode for both (each model runs each shape --repeats times, the last timed), and the time spent inside the
MoE blocks (CUDA events, one extra run). --stock-experts eager also times the stock model on transformers' per-expert
loop backend and compares it with the default stock run (the model's own bf16 noise floor). Layers are trimmed to fit --weight-budget-gib (the published count is reported next to the
used one). Writes whole_model.json + whole_model.md to --out (after every architecture, so a time limit still
leaves the finished ones).

    python3 bench/torch/whole_model.py --out $OUT                     # device: torch + transformers + grace
    python3 bench/torch/whole_model.py --dry-run --out /tmp/wm         # anywhere: configs, trimming, shapes only

Needs transformers >= 5 for the fused experts modules (4.x ModuleList blocks work too, through GraceMoeBlock).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

# Published config.json values (Hugging Face model repositories named in "source"); only fields that set a shape or
# the routing are written. rope_scaling (yarn) of DeepSeek-V2-Lite and GPT-OSS is left out: it changes positions,
# not shapes, and random weights make it irrelevant.
ARCHS = {
    "olmoe": dict(
        source="allenai/OLMoE-1B-7B-0924", model_type="olmoe",
        config=dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                    norm_topk_prob=False, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)),
    "qwen3_moe": dict(
        source="Qwen/Qwen3-30B-A3B", model_type="qwen3_moe",
        config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                    mlp_only_layers=[], rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                    tie_word_embeddings=False)),
    "mixtral": dict(
        source="mistralai/Mixtral-8x7B-v0.1", model_type="mixtral",
        config=dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
                    tie_word_embeddings=False)),
    "deepseek_v2_lite": dict(
        source="deepseek-ai/DeepSeek-V2-Lite", model_type="deepseek_v2",
        config=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
                    kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                    routed_scaling_factor=1.0, scoring_func="softmax", rope_theta=10000.0,
                    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "gpt_oss": dict(
        source="openai/gpt-oss-20b", model_type="gpt_oss",
        config=dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                    num_experts_per_tok=4, sliding_window=128, rope_theta=150000.0, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, attention_bias=True, swiglu_limit=7.0, tie_word_embeddings=False)),
    "qwen2_moe": dict(
        source="Qwen/Qwen1.5-MoE-A2.7B", model_type="qwen2_moe",
        config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                    shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0, max_position_embeddings=8192,
                    rms_norm_eps=1e-6, tie_word_embeddings=False)),
}

SHAPES = "256x128+16,512x64+32"


def parse_shapes(text):
    out = []
    for part in text.split(","):
        try:
            bs, rest = part.strip().lower().split("x")
            prompt, decode = rest.split("+")
            b, p, d = int(bs), int(prompt), int(decode)
        except ValueError:
            raise SystemExit(f"whole_model.py: error: --shapes: {part!r} is not BATCHxPROMPT+DECODE (e.g. 256x128+16)")
        if b < 1 or p < 1 or d < 1:
            raise SystemExit(f"whole_model.py: error: --shapes: {part!r} needs positive sizes")
        out.append((b, p, d))
    return out


def layer_types(n):
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def count_params(arch, c, num_layers):
    """Parameter count of the model at ``num_layers`` decoder layers (embeddings, attention, MoE/dense MLPs,
    lm_head; norms left out)."""
    h, v = c["hidden_size"], c["vocab_size"]
    total = 2 * v * h
    if arch == "deepseek_v2_lite":
        heads, nope, rope, vd, r = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                                    c["v_head_dim"], c["kv_lora_rank"])
        attn = h * heads * (nope + rope) + h * (r + rope) + r * heads * (nope + vd) + heads * vd * h
    else:
        hd = c.get("head_dim") or h // c["num_attention_heads"]
        attn = h * hd * (c["num_attention_heads"] * 2 + c["num_key_value_heads"] * 2)
    for layer in range(num_layers):
        total += attn
        if arch == "deepseek_v2_lite" and layer < c["first_k_dense_replace"]:
            total += 3 * h * c["intermediate_size"]
            continue
        if arch == "gpt_oss":
            e, i = c["num_local_experts"], c["intermediate_size"]
            total += e * (3 * h * i + 2 * i + h) + e * (h + 1)
            continue
        e = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
        i = c.get("moe_intermediate_size") or c["intermediate_size"]
        total += e * 3 * h * i + e * h
        if arch == "qwen2_moe":
            total += 3 * h * c["shared_expert_intermediate_size"] + h
        if arch == "deepseek_v2_lite":
            total += 3 * h * i * c["n_shared_experts"]
    return total


def plan_archs(args):
    """Per architecture: the config actually built and what was trimmed."""
    out = {}
    for arch in args.archs:
        spec = ARCHS[arch]
        c = dict(spec["config"])
        published = c["num_hidden_layers"]
        n = args.layers or published
        why = "--layers" if args.layers else ""
        if not args.layers:
            while n > 1 and count_params(arch, c, n) * 2 > args.weight_budget_gib * 2**30:
                n -= 1
            if n < published:
                why = (f"bf16 weights {count_params(arch, c, published) * 2 / 2**30:.1f} GiB at {published} layers "
                       f"> --weight-budget-gib {args.weight_budget_gib:g}")
        n = min(n, published)
        c["num_hidden_layers"] = n
        if arch == "gpt_oss":
            c["layer_types"] = layer_types(n)
        out[arch] = dict(source=spec["source"], model_type=spec["model_type"], config=c, published_layers=published,
                         used_layers=n, trimmed=n < published, trim_reason=why,
                         params=count_params(arch, c, n), weight_gib=count_params(arch, c, n) * 2 / 2**30)
    return out


# ------------------------------------------------------------------------------------------------------------------
# device part (torch + transformers)


def build_model(info, device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers picks the attention: SDPA where the model supports it, eager for GPT-OSS (attention sinks)
    cfg = AutoConfig.for_model(info["model_type"], **info["config"])
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def make_plan(model, info, device):
    """A 1x1 plan by grace: from a trace recorded on the stock model (grace.recorder), or from a uniform generated
    trace where the recorder does not know the block (GPT-OSS)."""
    import numpy as np
    import torch

    import grace
    import grace.hf
    from grace.recorder import NoMoEBlockError, RoutingRecorder

    blocks = grace.hf.moe_blocks(model)
    c = info["config"]
    e = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
    k = c["num_experts_per_tok"]
    try:
        rec = RoutingRecorder(model)
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, c["vocab_size"], (8, 64), generator=g).to(device)
        rec.record_batch(ids)
        trace, _ = rec.trace()
        rec.remove()
        how = f"recorded: {trace.shape[0]} tokens (8 x 64 random prompts) through the stock model"
    except NoMoEBlockError:
        rng = np.random.default_rng(7)
        trace = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in blocks]) for _ in range(512)])
        trace = trace.astype(np.int32)
        how = f"generated: 512 tokens, uniform top-{k} (grace.recorder does not record {type(blocks[0][1]).__name__})"
    stats = grace.profile(trace, e, topology="1x1")
    return grace.plan(stats, "1x1"), how


def forward(model, ids, past, keep):
    kw = dict(input_ids=ids, use_cache=True)
    if past is not None:
        kw["past_key_values"] = past
    if keep:
        kw["logits_to_keep"] = 1
    out = model(**kw)
    return out.logits[:, -1, :], out.past_key_values


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def greedy(model, prompt, steps, keep, watch=8):
    """Prefill + ``steps`` greedy tokens. Returns tokens [B, steps], prefill logits [B, V] (bf16, on the model's
    device), logits of the first ``watch`` sequences per step (float32, CPU), prefill and decode seconds."""
    import torch

    sync(prompt.device)
    t0 = time.perf_counter()
    logits, past = forward(model, prompt, None, keep)
    tok = logits.argmax(-1)
    sync(prompt.device)
    t1 = time.perf_counter()
    prefill_logits = logits.to(torch.bfloat16)
    watched = [logits[:watch].float().cpu()]
    toks = [tok]
    for _ in range(steps - 1):
        logits, past = forward(model, tok[:, None], past, keep)
        tok = logits.argmax(-1)
        toks.append(tok)
        watched.append(logits[:watch].float().cpu())
    sync(prompt.device)
    t2 = time.perf_counter()
    return torch.stack(toks, 1), prefill_logits, watched, t1 - t0, t2 - t1


def moe_block_modules(model):
    """The MoE blocks of ``model`` as they run now: transformers' blocks grace.hf knows (5.x keeps them and swaps
    their experts) and grace.hf's 4.x replacement blocks."""
    import grace.hf

    known = set(grace.hf.HF_MOE_BLOCKS) | {"GraceMoeBlock"}
    return [m for m in model.modules() if type(m).__name__ in known]


def moe_share(model, prompt, steps, keep):
    """One extra greedy run with CUDA events around every MoE block: (seconds in MoE blocks during prefill,
    during decode). Not part of the timed runs (the events add a little host work per block)."""
    import torch

    blocks = moe_block_modules(model)
    if not blocks or prompt.device.type != "cuda":
        return None, None
    spans = []

    def pre(_m, _args):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        spans.append([e, None])

    def post(_m, _args, _out):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        spans[-1][1] = e

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        with torch.no_grad():
            greedy(model, prompt, steps, keep)
    finally:
        for h in hooks:
            h.remove()
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in spans]
    n = len(blocks)  # the prefill is the first forward: one span per block
    return sum(ms[:n]) / 1e3, sum(ms[n:]) / 1e3


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_shape(model, info, shape, keep, device, stock=None, repeats=2):
    """Greedy prefill + decode of one shape, ``repeats`` times on the same prompt; the last run is the one timed
    and compared (the first grows torch's allocator pools and GRACE's shared workspace to this shape)."""
    import torch

    b, p, d = shape
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, info["config"]["vocab_size"], (b, p), generator=g).to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(max(1, repeats)):
            toks, pl, watched, tp, td = greedy(model, prompt, d, keep)
    moe_prefill_s, moe_decode_s = moe_share(model, prompt, d, keep)
    res = dict(timed_run=f"{max(1, repeats)} of {max(1, repeats)}", prefill_s=tp, decode_s=td,
               moe_prefill_s=moe_prefill_s, moe_decode_s=moe_decode_s, prefill_tok_s=b * p / tp,
               decode_tok_s=b * (d - 1) / td if d > 1 else None,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    if stock is None:
        return res, (toks, pl, watched)
    s_toks, s_pl, s_watched = stock
    same = (toks == s_toks)
    diverge = torch.where(same.all(1), torch.full((b,), d, device=same.device), (~same).int().argmax(1))
    step_err = []
    for step in range(d):
        rows = [r for r in range(min(8, b)) if int(diverge[r]) >= step]  # history identical up to this step
        if rows:
            step_err.append(rel(watched[step][rows], s_watched[step][rows]))
    res.update(identical_sequences=int(same.all(1).sum()), sequences=b, steps=d,
               first_divergence_min=int(diverge.min()), first_divergence_mean=float(diverge.float().mean()),
               prefill_logits_rel_err=rel(pl, s_pl), step_logits_rel_err_max=max(step_err) if step_err else None,
               token_agreement=float(same.float().mean()))
    return res, None


def run_arch(arch, info, shapes, args, build=None, patch_kwargs=None):
    """One architecture: build (``build(info, device, dtype)``, default build_model), plan, stock runs, patch,
    grace runs. ``patch_kwargs`` go to grace.hf.patch (tests pass a reference buffer factory)."""
    import inspect

    import torch

    import grace
    import grace.hf

    rec = dict(arch=arch, **{k: info[k] for k in ("source", "published_layers", "used_layers", "trimmed",
                                                     "trim_reason", "params", "weight_gib")})
    t0 = time.time()
    device, dtype = args.device, getattr(torch, args.dtype)
    if torch.cuda.is_available():  # what earlier architectures left (a leak shows here, not in this one's peak)
        free, total = torch.cuda.mem_get_info()
        rec["cuda_at_start_gib"] = dict(allocated=torch.cuda.memory_allocated() / 2**30,
                                        reserved=torch.cuda.memory_reserved() / 2**30, free=free / 2**30,
                                        total=total / 2**30)
    model = (build or build_model)(info, device, dtype)
    rec["build_s"] = time.time() - t0
    rec["model_class"] = type(model).__name__
    blocks = grace.hf.moe_blocks(model)
    rec["moe_blocks"] = len(blocks)
    rec["block_class"] = type(blocks[0][1]).__name__ if blocks else None
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    plan, rec["trace"] = make_plan(model, info, device)
    rec["plan_topology"] = "1x1"
    results = {}
    # warm-up of the stock model on a small batch, then the timed stock runs (tokens kept for the comparison)
    with torch.no_grad():
        greedy(model, torch.zeros(2, 8, dtype=torch.long, device=device), 2, keep)
    get_impl = getattr(model, "get_experts_implementation", None)
    rec["stock_experts_implementation"] = get_impl() if callable(get_impl) else "n/a (transformers 4.x)"
    stock = {}
    for shape in shapes:
        b, p, d = shape
        while True:
            name = f"{b}x{p}+{d}"
            try:
                res, kept = run_shape(model, info, (b, p, d), keep, device, repeats=args.repeats)
                stock[name] = ((b, p, d), kept)
                results[name] = dict(requested=f"{shape[0]}x{shape[1]}+{shape[2]}", stock=res)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if b <= 16:
                    results[name] = dict(requested=f"{shape[0]}x{shape[1]}+{shape[2]}", stock="out of memory")
                    break
                b //= 2  # smaller batch, stated in the output
    # The same shapes with the stock block on transformers' loop-over-experts backend ("eager"), where the model
    # has the switch (transformers 5.x): the baseline grace.hf replaces in 4.x, for reference.
    set_impl = getattr(model, "set_experts_implementation", None)
    extra = [b for b in getattr(args, "stock_experts", []) if b]
    if callable(set_impl) and callable(get_impl) and extra:
        default = get_impl()
        for backend in extra:
            try:
                set_impl(backend)
                for name, (shape, kept) in stock.items():
                    # compared with the default backend's tokens and logits like GRACE is: the model's own bf16
                    # noise floor (two correct implementations that round differently)
                    res, _ = run_shape(model, info, shape, keep, device, stock=kept, repeats=args.repeats)
                    results[name][f"stock_{backend}"] = res
            except Exception as e:  # noqa: BLE001 - an unavailable backend is reported, the run goes on
                for name in stock:
                    results[name][f"stock_{backend}"] = f"{type(e).__name__}: {e}"
        set_impl(default.get("", default) if isinstance(default, dict) else default)
    try:
        t1 = time.time()
        grace.hf.patch(model, plan, **(patch_kwargs or {}))
        rec["patch_s"] = time.time() - t1
        with torch.no_grad():
            greedy(model, torch.zeros(2, 8, dtype=torch.long, device=device), 2, keep)
        for name, (shape, kept) in stock.items():
            try:
                res, _ = run_shape(model, info, shape, keep, device, stock=kept, repeats=args.repeats)
                results[name]["grace"] = res
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                results[name]["grace"] = "out of memory"
    except Exception as e:  # noqa: BLE001 - reported per architecture; the other architectures still run
        rec["grace_error"] = f"{type(e).__name__}: {e}"
        rec["grace_traceback"] = short_traceback(6)
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            rec["cuda_at_error_gib"] = dict(allocated=torch.cuda.memory_allocated() / 2**30,
                                            reserved=torch.cuda.memory_reserved() / 2**30, free=free / 2**30)
    rec["shapes"] = results
    del model, stock, blocks  # blocks holds the MoE modules too: all of the model's memory goes back now
    gc.collect()  # the patched modules and their Buffers may sit in reference cycles with the model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rec


def short_traceback(limit):
    """traceback.format_exc with the machine's own directories cut out of the file names (the repository root;
    site-packages and the standard library as <site-packages>/ and <stdlib>/), so that a recorded result names no
    local path."""
    import re
    import sysconfig

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
    stdlib = sysconfig.get_paths()["stdlib"] + os.sep

    def short(m):
        path = m.group(1)
        if path.startswith(root):
            path = path[len(root):]
        else:
            path = re.sub(r"^.*?[/\\](?:site|dist)-packages[/\\]", "<site-packages>/", path)
            if path.startswith(stdlib):
                path = "<stdlib>/" + path[len(stdlib):]
        return f'File "{path}"'

    return re.sub(r'File "([^"]*)"', short, traceback.format_exc(limit=limit))


def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"
    return str(x)


def write_outputs(out_dir, report):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "whole_model.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = ["# grace.hf whole-model run", "", report["environment"], ""]
    impls = {r["arch"]: r.get("stock_experts_implementation") for r in report["architectures"] if "error" not in r}
    if impls:
        lines += ["Stock experts backend (transformers' default): " +
                  ", ".join(f"{a}: {v}" for a, v in impls.items()), ""]
    lines.append("| arch (config of) | layers used / published | MoE block | shape BxP+D | stock prefill tok/s | "
                 "grace prefill tok/s | stock decode tok/s | grace decode tok/s | identical seqs | first divergence "
                 "(min / mean step) | prefill logits rel err | step logits rel err (max) |")
    lines.append("|---" * 12 + "|")
    notes = []
    for r in report["architectures"]:
        if "error" in r:
            notes.append(f"- {r['arch']}: {r['error']}")
            continue
        lay = f"{r['used_layers']} / {r['published_layers']}" + (" (trimmed)" if r["trimmed"] else "")
        if r["trimmed"]:
            notes.append(f"- {r['arch']}: layers trimmed to {r['used_layers']} of {r['published_layers']}: "
                         f"{r['trim_reason']}")
        if "grace_error" in r:
            notes.append(f"- {r['arch']}: grace.hf/grace.ep failed: {r['grace_error']}")
        notes.append(f"- {r['arch']}: plan trace {r['trace']}")
        for name, s in r["shapes"].items():
            st, gr = s.get("stock"), s.get("grace")
            if name != s["requested"]:
                notes.append(f"- {r['arch']}: {s['requested']} did not fit; ran {name}")
            row = [f"{r['arch']} ({r['source']})", lay, r.get("block_class"), name]
            if isinstance(st, dict) and isinstance(gr, dict):
                row += [fmt(st["prefill_tok_s"], 0), fmt(gr["prefill_tok_s"], 0), fmt(st["decode_tok_s"], 0),
                        fmt(gr["decode_tok_s"], 0), f"{gr['identical_sequences']} / {gr['sequences']}",
                        f"{gr['first_divergence_min']} / {gr['first_divergence_mean']:.1f} of {gr['steps']}",
                        fmt(gr["prefill_logits_rel_err"], 4), fmt(gr["step_logits_rel_err_max"], 4)]
            else:
                row += [fmt(st["prefill_tok_s"], 0) if isinstance(st, dict) else str(st), str(gr or "-"),
                        fmt(st["decode_tok_s"], 0) if isinstance(st, dict) else "-"] + ["-"] * 5
            lines.append("| " + " | ".join(str(x) for x in row) + " |")
    split = []
    for r in report["architectures"]:
        for name, sh in r.get("shapes", {}).items():
            for label in ["stock"] + sorted(k for k in sh if k.startswith("stock_")) + ["grace"]:
                v = sh.get(label)
                if not isinstance(v, dict):
                    continue
                split.append(f"| {r['arch']} | {name} | {label} | {fmt(v['prefill_s'] * 1e3)} | "
                             f"{fmt((v.get('moe_prefill_s') or 0) * 1e3) if v.get('moe_prefill_s') is not None else '-'} | "
                             f"{fmt(v['decode_s'] * 1e3)} | "
                             f"{fmt(v['moe_decode_s'] * 1e3) if v.get('moe_decode_s') is not None else '-'} | "
                             f"{fmt(v['prefill_tok_s'], 0)} | {fmt(v['decode_tok_s'], 0)} | "
                             + (f"{v['identical_sequences']} / {v['sequences']} | {fmt(v['prefill_logits_rel_err'], 4)} |"
                                if "identical_sequences" in v else "- | - |"))
    if split:
        lines += (["", "Where the time goes (ms; 'in MoE' = CUDA-event time inside the MoE blocks, from one extra run "
                  "with hooks; stock_X = the stock block on transformers' experts backend X):", "",
                  "| arch | shape | block | prefill | in MoE | decode (all steps) | in MoE | prefill tok/s | "
                  "decode tok/s | identical seqs vs stock | prefill logits rel err vs stock |", "|---" * 11 + "|"]
                  + split)
    lines += ["", "Random weights (published shapes, bf16); greedy decode; 'first divergence' = first step whose "
              "greedy token differs from the stock model's (= steps when none does).", ""] + notes
    with open(os.path.join(out_dir, "whole_model.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/whole_model"), help="output folder")
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {','.join(ARCHS)}")
    ap.add_argument("--shapes", default=SHAPES, help="BATCHxPROMPT+DECODE,... (default %(default)s)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers to build (default: published, trimmed "
                    "to --weight-budget-gib)")
    ap.add_argument("--weight-budget-gib", type=float, default=32.0,
                    help="bf16 weight budget per model (GiB; the rest of the GPU holds activations, KV cache and "
                    "grace.ep buffers)")
    ap.add_argument("--device", default="cuda", help="torch device (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per shape and model, the last timed (default %(default)s: the first warms the caches)")
    ap.add_argument("--stock-experts", default="",
                    help="comma-separated extra transformers experts backends to time the stock model with (e.g. "
                    "eager), besides the model's default; transformers 5.x only")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="weights (default %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="only print/write the configs, trimming and shapes")
    args = ap.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    args.stock_experts = [b.strip() for b in args.stock_experts.split(",") if b.strip()]
    bad = [a for a in args.archs if a not in ARCHS]
    if bad:
        ap.error(f"--archs: unknown {','.join(bad)} (known: {','.join(ARCHS)})")
    if args.layers < 0:
        ap.error(f"--layers: {args.layers} is negative")
    if not args.weight_budget_gib > 0:
        ap.error(f"--weight-budget-gib: {args.weight_budget_gib} must be positive")
    shapes = parse_shapes(args.shapes)
    infos = plan_archs(args)
    if args.dry_run:
        report = dict(dry_run=True, shapes=[f"{b}x{p}+{d}" for b, p, d in shapes], architectures=infos)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "whole_model_dry_run.json"), "w") as f:
            json.dump(report, f, indent=1)
        for a, i in infos.items():
            trim = f"trimmed: {i['trim_reason']}" if i["trimmed"] else "not trimmed"
            print(f"{a:18s} {i['source']:32s} layers {i['used_layers']:3d} / {i['published_layers']:3d} "
                  f"({trim}); {i['params'] / 1e9:.2f} B params, {i['weight_gib']:.1f} GiB bf16")
        return 0

    import torch
    import transformers

    import grace

    dev = (f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
           if torch.device(args.device).type == "cuda" else args.device)
    env = (f"transformers {transformers.__version__}, torch {torch.__version__}, grace {grace.__version__}, "
           f"device {dev}, {args.dtype}")
    print(env, flush=True)
    report = dict(environment=env, shapes=[f"{b}x{p}+{d}" for b, p, d in shapes], architectures=[])
    for arch in args.archs:
        t0 = time.time()
        print(f"== {arch}: {infos[arch]['used_layers']} of {infos[arch]['published_layers']} layers", flush=True)
        try:
            rec = run_arch(arch, infos[arch], shapes, args)
        except Exception as e:  # noqa: BLE001 - one architecture failing must not lose the others
            rec = dict(arch=arch, error=f"{type(e).__name__}: {e}", traceback=short_traceback(8))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rec["wall_s"] = time.time() - t0
        report["architectures"].append(rec)
        write_outputs(args.out, report)
        print(json.dumps({k: v for k, v in rec.items() if k != "grace_traceback"}, default=str)[:1500], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
