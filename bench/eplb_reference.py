#!/usr/bin/env python3
"""NumPy re-statement of DeepSeek's EPLB (spec §8), written from the algorithm description, for a side-by-side
timing with bench/bm_eplb.cpp on the identical input (DeepSeek-V3 scale: 58 layers x 256 experts, 288 physical
slots, 4 nodes, 32 GPUs, 8 groups). Checks the README golden vectors first.

Like EPLB it vectorizes over layers where the algorithm allows (replication, gathers) and loops in Python where
it is sequential (the greedy packing). Sorts are stable (ties keep the lower index), as in grace's C++ code.

Usage: /usr/bin/python3 bench/eplb_reference.py [--repeats N]
"""
import argparse
import time

import numpy as np


def balanced_packing(weight, num_packs):
    """weight [R, n] -> (pack_index [R, n], rank_in_pack [R, n]); n / num_packs items per pack, heaviest first,
    each to the lightest pack with room (ties: lower pack index)."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (rows, 1)), np.zeros((rows, n), dtype=np.int64)
    order = np.argsort(-weight, axis=-1, kind="stable")
    pack_index = np.full((rows, n), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, n), -1, dtype=np.int64)
    for r in range(rows):
        pack_weight = [0.0] * num_packs
        pack_items = [0] * num_packs
        w = weight[r]
        for item in order[r]:
            best = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=pack_weight.__getitem__)
            pack_index[r, item] = best
            rank_in_pack[r, item] = pack_items[best]
            pack_weight[best] += w[item]
            pack_items[best] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight, num_phy):
    """weight [R, n] -> (phy2log [R, num_phy], rank [R, num_phy], logcnt [R, n]) by water-filling: each extra
    slot goes to the expert with the highest load per replica (ties: lower index)."""
    rows, n = weight.shape
    phy2log = np.tile(np.arange(num_phy), (rows, 1))
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, n), dtype=np.int64)
    ar = np.arange(rows)
    for p in range(n, num_phy):
        best = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, p] = best
        rank[:, p] = logcnt[ar, best]
        logcnt[ar, best] += 1
    return phy2log, rank, logcnt


def inverse(perm):
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.tile(np.arange(perm.shape[1]), (perm.shape[0], 1)), axis=1)
    return inv


def rebalance_hierarchical(weight, num_phy, num_groups, num_nodes, num_gpus):
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    # 1. groups -> nodes
    tokens_per_group = weight.reshape(layers, num_groups, group_size).sum(-1)
    gpack, grank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None] + np.arange(group_size)).reshape(layers, -1)
    mlog2log = inverse(log2mlog)
    # 2. replicate inside each node: rows are (layer, node)
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_phy // num_nodes)
    # 3. physical experts -> GPUs of the node, by load per replica
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, axis=-1)
    pack, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = inverse(pack * phy_per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1)
                 + np.arange(0, num_log, num_log // num_nodes)[None, :, None]).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, axis=-1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """weight [L, E] -> (phy2log [L, P], log2phy [L, E, X], logcnt [L, E])."""
    weight = np.asarray(weight, dtype=np.float64)
    layers, num_log = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    x = int(logcnt.max())
    log2phy = np.full((layers, num_log * x), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * x + phyrank, np.tile(np.arange(num_replicas), (layers, 1)), axis=-1)
    return phy2log, log2phy.reshape(layers, num_log, x), logcnt


def skewed_loads(layers, experts, seed):
    """The same input as bench/bench_util.hpp skewed_loads (same LCG)."""
    s = seed
    out = np.empty(layers * experts)
    mask = (1 << 64) - 1

    def nxt():
        nonlocal s
        s = (s * 6364136223846793005 + 1442695040888963407) & mask
        return s >> 33

    for i in range(layers * experts):
        rank = 1.0 + float(nxt() % experts)
        out[i] = float(int(200000.0 / rank)) + float(nxt() % 97)
    return out.reshape(layers, experts)


def check_golden():
    w = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    p, _, c = rebalance_experts(w, 16, 4, 2, 8)
    assert p.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                          [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]], p
    assert c.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]], c
    p, _, c = rebalance_experts(w, 16, 3, 2, 8)
    assert p.tolist() == [[10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1],
                          [1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7]], p
    assert c.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1]], c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    check_golden()
    print("golden vectors: OK")
    w = skewed_loads(58, 256, 2024)
    for name, groups in (("hierarchical (num_groups=8)", 8), ("global (num_groups=7)", 7)):
        rebalance_experts(w, 288, groups, 4, 32)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rebalance_experts(w, 288, groups, 4, 32)
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"DeepSeek-V3 58x256 -> 288 slots, 4 nodes, 32 GPUs, {name}: "
              f"median {1e3 * times[len(times) // 2]:.1f} ms, min {1e3 * times[0]:.1f} ms over {args.repeats} runs")


if __name__ == "__main__":
    main()
