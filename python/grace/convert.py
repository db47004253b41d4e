"""Command line of grace.converters: ``python3 -m grace.convert {sglang-trace,sglang-stats,vllm-stats} ...``.

Exit status 0 on success, 1 with ``grace.convert: error: ...`` on a bad or inconsistent dump.
"""

import argparse
import sys

from .converters import ConversionError, sglang_per_token_to_trace, sglang_stat_to_stats, vllm_eplb_to_stats


def _layers(text):
    return [int(x) for x in text.split(",")] if text else None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m grace.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("sglang-trace", help="SGLang per_token dumps -> trace (.npy + .json)")
    a.add_argument("dumps", nargs="+", help="per_token dump files (.pt, .json or .npz), one per rank")
    a.add_argument("-o", "--output", required=True, help="trace path (.npy)")
    a.add_argument("--experts", type=int, help="number of logical experts E (default: map max + 1)")
    a.add_argument("--ranks", type=_layers, help="keep only these ranks, e.g. 0,1")
    a.add_argument("--layers", type=_layers, help="MoE layer indices (default: layers with recorded ids)")
    a.add_argument("--no-dedupe", action="store_true", help="keep identical records of several ranks")
    b = sub.add_parser("sglang-stats", help="SGLang stat dump (logical_count) -> statistics folder")
    b.add_argument("dump")
    c = sub.add_parser("vllm-stats", help="vLLM EPLB load window -> statistics folder")
    c.add_argument("dump", help=".pt/.json/.npz with expert_load_window and physical_to_logical_map")
    c.add_argument("--experts", type=int, help="number of logical experts E (default: map max + 1)")
    for s in (b, c):
        s.add_argument("-o", "--output", required=True, help="statistics folder")
        s.add_argument("--top-k", type=int, default=0, help="k of the model (sets num_tokens = load / k)")
        s.add_argument("--layers", type=_layers, help="layer indices to keep")
    for s in (a, b, c):
        s.add_argument("--model", default="")
        s.add_argument("--dataset", default="")
    args = p.parse_args(argv)
    try:
        if args.cmd == "sglang-trace":
            ids, meta = sglang_per_token_to_trace(args.dumps, args.output, num_experts=args.experts, model=args.model,
                                                  dataset=args.dataset, ranks=args.ranks, layers=args.layers,
                                                  dedupe=not args.no_dedupe)
            print(f"wrote {args.output}: T={ids.shape[0]} L={ids.shape[1]} k={ids.shape[2]} "
                  f"E={meta['num_experts']} (MoE layers {meta['moe_layers']})")
        elif args.cmd == "sglang-stats":
            r = sglang_stat_to_stats(args.dump, args.output, top_k=args.top_k, model=args.model,
                                     dataset=args.dataset, layers=args.layers)
            print(f"wrote {args.output}: L={r['load'].shape[0]} E={r['load'].shape[1]} (loads only)")
        else:
            r = vllm_eplb_to_stats(args.dump, args.output, num_experts=args.experts, top_k=args.top_k,
                                   model=args.model, dataset=args.dataset, layers=args.layers)
            print(f"wrote {args.output}: L={r['load'].shape[0]} E={r['load'].shape[1]} (loads only)")
    except (ConversionError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"grace.convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
