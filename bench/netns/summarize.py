#!/usr/bin/python3
"""Summarises an OUT_DIR of bench/netns/run_slow_link.sh as Markdown: per scheme, the median over repeats of the
`grace run` phase times (max over ranks of each rank's sum over layers and batches), the runtime's cross-node
bytes, the bytes the veth really carried, and the ratios to flat."""
import csv
import json
import pathlib
import statistics
import sys

SCHEMES = ["flat", "flat-dedup", "hsc"]


def wire(bytes_json, cls):
    """payload + metadata + control of dispatch and combine on one link class, summed over ranks."""
    return sum(bytes_json[d][cls][f] for d in ("dispatch", "combine") for f in ("payload", "metadata", "control"))


def main(out):
    out = pathlib.Path(out)
    veth = {}
    with open(out / "veth.tsv") as f:
        for scheme, rep, b in csv.reader(f, delimiter="\t"):
            veth.setdefault(scheme, []).append(int(b))
    rows = {}
    first = None
    for s in SCHEMES:
        reps = sorted(out.glob(f"run_{s}_*.json"))
        if not reps:
            continue
        runs = [json.loads(p.read_text()) for p in reps]
        first = first or runs[0]
        t = {ph: [r["time_s"][ph]["max"] * 1e3 for r in runs]
             for ph in ("dispatch", "combine", "expert", "total", "hsc_overlap")}
        t["a2a"] = [d + c for d, c in zip(t["dispatch"], t["combine"])]
        t["a2a_mean"] = [(r["time_s"]["dispatch"]["mean"] + r["time_s"]["combine"]["mean"]) * 1e3 for r in runs]
        rows[s] = {
            "n": len(runs),
            "med": {k: statistics.median(v) for k, v in t.items()},
            "all_a2a": t["a2a"],
            "cross": wire(runs[0]["bytes"], "cross_node"),
            "intra": wire(runs[0]["bytes"], "intra_node"),
            "veth": statistics.median(veth.get(s, [0])),
        }
    if not rows:
        sys.exit("summarize: no run_*.json in " + str(out))
    print(f"grace run: topology {first['topology']}, {first['num_tokens']} tokens, {first['layers']} layers, "
          f"{first['batch_tokens']} tokens per rank per forward ({first['steps_per_layer']} forwards per layer), "
          f"H={first['hidden']}, k={first['top_k']}, {first['dtype']}; times in ms, max over ranks of the per-rank "
          f"sum over all forwards (d+c mean: mean over ranks instead of max), median of {rows[SCHEMES[0]]['n']} interleaved repeats.\n")
    print("| scheme | dispatch | combine | dispatch+combine | vs flat | d+c mean over ranks | vs flat | expert | total | hsc overlap | "
          "cross-node MB (runtime) | veth MB (measured) | veth / runtime | intra-node MB | dispatch+combine per repeat |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = rows.get("flat", next(iter(rows.values())))["med"]["a2a"]
    base_mean = rows.get("flat", next(iter(rows.values())))["med"]["a2a_mean"]
    for s, r in rows.items():
        m = r["med"]
        print(f"| {s} | {m['dispatch']:.1f} | {m['combine']:.1f} | {m['a2a']:.1f} | {m['a2a'] / base:.2f} | "
              f"{m['a2a_mean']:.1f} | {m['a2a_mean'] / base_mean:.2f} | "
              f"{m['expert']:.1f} | {m['total']:.1f} | {m['hsc_overlap']:.1f} | {r['cross'] / 1e6:.1f} | "
              f"{r['veth'] / 1e6:.1f} | {r['veth'] / r['cross']:.3f} | {r['intra'] / 1e6:.1f} | "
              f"{', '.join(f'{x:.0f}' for x in r['all_a2a'])} |")
    if "flat" in rows and "hsc" in rows:
        f, h = rows["flat"], rows["hsc"]
        print(f"\nHSC vs flat: dispatch+combine time x{h['med']['a2a'] / f['med']['a2a']:.2f} "
              f"({(1 - h['med']['a2a'] / f['med']['a2a']) * 100:+.1f}% saved), cross-node bytes "
              f"x{h['cross'] / f['cross']:.2f} ({(1 - h['cross'] / f['cross']) * 100:+.1f}% saved).")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "slow-link-out")
