// Dispatch + combine of the MPI runtime, reported as nccl-tests report collectives (definitions in
// bench/results/runtime.md). Run: mpirun -n 4 build/bench/mpi/bench_dispatch 2x2 [tokens_per_rank] [iters]
//   For each scheme (flat, flat-dedup, hsc) in one run: OLMoE-shaped activations (H = 2048 fp32, E = 64, k = 8),
//   skewed seeded top-k routing, primaries e*G/E plus a replica of 8 hot experts on the other node, TAR routing.
//   t = max over ranks of (dispatch_s + combine_s) of one forward, median over the timed iterations.
//   algbw = S / t with S = 2 * T_local * k * H * 4 (the activations of every selection, out and back: the same
//   for every scheme); busbw = algbw * (n - 1) / n (nccl-tests' all-to-all factor); wirebw = bytes this rank
//   really sent (payload + metadata + control, dispatch + combine, mean over ranks) / t.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "core/rng.hpp"
#include "grace/communicator.hpp"
#include "grace/experts.hpp"
#include "grace/runtime.hpp"

using namespace grace;

int main(int argc, char** argv) {
    const Topology topo = Topology::parse(argc > 1 ? argv[1] : "2x2");
    const int64_t T_local = argc > 2 ? std::atoll(argv[2]) : 512;
    const int iters = argc > 3 ? std::atoi(argv[3]) : 20;
    constexpr int E = 64, k = 8, H = 2048, I = 16, kWarmup = 3;
    auto comm = make_communicator("mpi", {topo});
    const int G = comm->size(), me = comm->rank(), M = topo.gpus_per_node;
    set_expert_threads(1);

    LayerPlan lp;
    lp.gpu_experts.assign(G, {});
    lp.primary_gpu.resize(E);
    for (int e = 0; e < E; ++e) {
        lp.primary_gpu[e] = e * G / E;
        lp.gpu_experts[e * G / E].push_back(e);
    }
    for (int e = 0; e < 8; ++e) lp.gpu_experts[(lp.primary_gpu[e] + M) % G].push_back(e);  // hot: 0..7
    lp.finalize(E);
    std::vector<ExpertWeights> mine;
    for (int e : lp.gpu_experts[me]) mine.push_back(random_expert(1, 0, e, {H, I}, DType::kF32));

    std::vector<float> x(static_cast<size_t>(T_local) * H), w(static_cast<size_t>(T_local) * k, 1.0f / k);
    std::vector<int32_t> ids(static_cast<size_t>(T_local) * k);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(to_unit(mix64(7, me, i)) - 0.5);
    for (int64_t t = 0; t < T_local; ++t) {
        std::set<int> used;
        uint64_t c = 0;
        for (int j = 0; j < k; ++j) {
            int e;
            do {
                const double u = to_unit(mix64(11, static_cast<uint64_t>(me * T_local + t), c++));
                e = u < 0.3 ? static_cast<int>(u / 0.3 * 8) : static_cast<int>((u - 0.3) / 0.7 * E);
            } while (used.count(e));
            used.insert(e);
            ids[t * k + j] = e;
        }
    }
    if (me == 0)
        std::printf("# %s, %d ranks, T_local=%lld, E=%d, k=%d, H=%d fp32, TAR, %d iterations (median)\n",
                    topo.to_string().c_str(), G, static_cast<long long>(T_local), E, k, H, iters);
    if (me == 0)
        std::printf(
            "| scheme | time (ms) | dispatch (ms) | combine (ms) | algbw (GB/s) | busbw (GB/s) | wire MB/rank | "
            "wirebw (GB/s) | cross-node MB |\n|---|---|---|---|---|---|---|---|---|\n");
    for (CommScheme scheme : {CommScheme::kFlat, CommScheme::kFlatDedup, CommScheme::kHsc}) {
        MoeLayer layer(lp, topo, *comm, mine, {scheme, RoutingPolicy::kTar});
        std::vector<double> times, disp, comb;
        double wire = 0, cross = 0;
        std::vector<float> out(x.size());
        for (int it = 0; it < kWarmup + iters; ++it) {
            comm->barrier();
            layer.forward(x.data(), ids.data(), w.data(), T_local, k, out.data(), me * T_local);
            const auto& st = layer.last_stats();
            std::vector<double> v{st.dispatch_s + st.combine_s, st.dispatch_s, st.combine_s};
            comm->allreduce_max(v);
            if (it < kWarmup) continue;
            times.push_back(v[0]);
            disp.push_back(v[1]);
            comb.push_back(v[2]);
            double bytes = 0, cr = 0;
            for (int c = 0; c < 2; ++c)
                for (const LinkBytes* b : {&st.dispatch[c], &st.combine[c]}) {
                    bytes += static_cast<double>(b->payload + b->metadata + b->control);
                    if (c == 1) cr += static_cast<double>(b->payload + b->metadata + b->control);
                }
            std::vector<double> s{bytes, cr};
            comm->allreduce_sum(s);
            wire = s[0] / G;
            cross = s[1];
        }
        auto median = [](std::vector<double> v) {
            std::sort(v.begin(), v.end());
            return v[v.size() / 2];
        };
        const double t = median(times);
        const double S = 2.0 * static_cast<double>(T_local) * k * H * 4;
        const double algbw = S / t / 1e9, busbw = algbw * (G - 1) / G;
        if (me == 0)
            std::printf("| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f | %.2f | %.1f |\n", to_string(scheme).c_str(),
                        t * 1e3, median(disp) * 1e3, median(comb) * 1e3, algbw, busbw, wire / 1e6, wire / t / 1e9,
                        cross / 1e6);
    }
    return 0;
}
