// MPI test of the MoE layer, run under mpiexec with N*M processes: `grace_mpi_tests NxM`.
// For every scheme x routing policy it replays a small seeded trace (2 layers, several uneven batches) and checks
//  1. every output equals a dense reference (each token: sum_j w_j * expert_{e_j}(x), plain-loop SwiGLU);
//  2. the bytes the runtime sent per link class (summed over ranks) equal an independent count of spec §6,
//     replayed here over the whole trace in trace order with a fresh ReplicaRouter;
//  3. combine sends back exactly what dispatch sent, per link class;
//  4. the same layer driven in phases (dispatch, experts, combine) gives forward's output bit for bit, and
//     dispatch delivers every selection of the trace exactly once, to a slot its rank holds.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "grace/communicator.hpp"
#include "grace/error.hpp"
#include "grace/eval.hpp"
#include "grace/experts.hpp"
#include "grace/plan.hpp"
#include "grace/routing.hpp"
#include "grace/runtime.hpp"
#include "traffic_count.hpp"

using namespace grace;

namespace {

constexpr int kExperts = 8, kTopK = 3, kLayers = 2, kHidden = 16, kInter = 12;

// A plan with uneven primaries and replicas (some across nodes), with non-uniform WRR weights.
ExpertPlan make_plan(const Topology& topo, uint64_t seed) {
    const int G = topo.num_gpus();
    ExpertPlan plan;
    plan.num_experts = kExperts;
    plan.num_layers = kLayers;
    plan.top_k = kTopK;
    plan.topology = topo;
    plan.method = "test";
    for (int l = 0; l < kLayers; ++l) {
        LayerPlan lp;
        lp.layer = l;
        lp.gpu_experts.assign(G, {});
        lp.primary_gpu.resize(kExperts);
        for (int e = 0; e < kExperts; ++e) {
            const int p = static_cast<int>(static_cast<int64_t>((e + l) % kExperts) * G / kExperts);
            lp.primary_gpu[e] = p;
            lp.gpu_experts[p].push_back(e);
            if ((e + l) % 3 == 0)
                for (int r = 1; r <= std::min(2, G - 1); ++r) lp.gpu_experts[(p + r * (1 + e % 2)) % G].push_back(e);
        }
        for (auto& g : lp.gpu_experts) {
            std::sort(g.begin(), g.end());
            g.erase(std::unique(g.begin(), g.end()), g.end());
        }
        for (int e = 0; e < kExperts; ++e) {  // a replica must not land on its primary's GPU
            auto& g = lp.gpu_experts[lp.primary_gpu[e]];
            if (std::find(g.begin(), g.end(), e) == g.end()) g.push_back(e);
        }
        lp.finalize(kExperts);
        for (int e = 0; e < kExperts; ++e) {
            std::vector<double> w;
            for (size_t i = 0; i < lp.instance_gpus[e].size(); ++i)
                w.push_back(0.2 + to_unit(mix64(seed, static_cast<uint64_t>(l * 100 + e), i)));
            lp.wrr_weights[e] = round_weights(w, lp.wrr_period);
        }
        plan.layers.push_back(lp);
    }
    plan.validate();
    return plan;
}

struct Trace {
    int64_t T = 0;
    std::vector<int32_t> ids;    // [T, L, k]
    std::vector<float> weights;  // [T, L, k]
};

Trace make_trace(int64_t T, uint64_t seed) {
    Trace tr;
    tr.T = T;
    tr.ids.resize(static_cast<size_t>(T) * kLayers * kTopK);
    tr.weights.resize(tr.ids.size());
    for (int64_t t = 0; t < T; ++t)
        for (int l = 0; l < kLayers; ++l) {
            // Skewed distinct experts: expert 0..2 are hot.
            std::set<int> used;
            double sum = 0;
            for (int j = 0; j < kTopK; ++j) {
                int e;
                uint64_t c = 0;
                do {
                    double u = to_unit(mix64(seed, static_cast<uint64_t>(t * 64 + l * 8 + j), c++));
                    e = u < 0.5 ? static_cast<int>(u * 6) : static_cast<int>((u - 0.5) * 2 * kExperts);
                } while (used.count(e));
                used.insert(e);
                const size_t i = (static_cast<size_t>(t) * kLayers + l) * kTopK + j;
                tr.ids[i] = e;
                tr.weights[i] = static_cast<float>(0.1 + to_unit(mix64(seed ^ 7, i, 0)));
                sum += tr.weights[i];
            }
            for (int j = 0; j < kTopK; ++j)
                tr.weights[(static_cast<size_t>(t) * kLayers + l) * kTopK + j] /= static_cast<float>(sum);
        }
    return tr;
}

bool run_case(Communicator& comm, const ExpertPlan& plan, const Trace& tr, CommScheme scheme, RoutingPolicy policy,
              int64_t batch, std::string& why) {
    const int G = comm.size(), me = comm.rank();
    const Topology& topo = plan.topology;
    const int64_t T = tr.T;
    auto block_begin = [&](int g) { return static_cast<int64_t>((static_cast<__int128>(g) * T + G - 1) / G); };
    const int64_t begin = block_begin(me), end = block_begin(me + 1), n_local = end - begin;
    int64_t max_local = 0;
    for (int g = 0; g < G; ++g) max_local = std::max(max_local, block_begin(g + 1) - block_begin(g));
    const int64_t steps = std::max<int64_t>(1, (max_local + batch - 1) / batch);

    double max_err = 0;
    std::vector<std::string> phase_errors;
    double served_total = 0;            // selections delivered by dispatch on this rank, all layers and steps
    std::vector<double> sent(16, 0.0);  // [dispatch|combine][intra|cross][payload, meta, control, copies]
    std::vector<double> matrix(static_cast<size_t>(G) * G, 0.0);  // [s, d] dispatch copies, all layers
    for (int l = 0; l < kLayers; ++l) {
        const LayerPlan& lp = plan.layers[l];
        std::vector<ExpertWeights> local, all;
        for (int e : lp.gpu_experts[me]) local.push_back(random_expert(42, l, e, {kHidden, kInter}, DType::kF32));
        for (int e = 0; e < kExperts; ++e) all.push_back(random_expert(42, l, e, {kHidden, kInter}, DType::kF32));
        MoeLayerOptions opt;
        opt.scheme = scheme;
        opt.policy = policy;
        opt.routing_seed = 5;
        // The same layer driven in phases (dispatch, experts, combine) must give forward's output bit for bit.
        MoeLayer phased(lp, topo, comm, local, opt);
        MoeLayer layer(lp, topo, comm, std::move(local), opt);
        for (int64_t s = 0; s < steps; ++s) {
            const int64_t b0 = std::min(n_local, s * batch), b1 = std::min(n_local, (s + 1) * batch), n = b1 - b0;
            std::vector<float> x(static_cast<size_t>(n) * kHidden);
            std::vector<int32_t> ids(static_cast<size_t>(n) * kTopK);
            std::vector<float> w(ids.size());
            for (int64_t t = 0; t < n; ++t) {
                const int64_t tg = begin + b0 + t;
                for (int h = 0; h < kHidden; ++h)
                    x[t * kHidden + h] = static_cast<float>(2 * to_unit(mix64(3, tg * 131 + l, h)) - 1);
                for (int j = 0; j < kTopK; ++j) {
                    ids[t * kTopK + j] = tr.ids[(tg * kLayers + l) * kTopK + j];
                    w[t * kTopK + j] = tr.weights[(tg * kLayers + l) * kTopK + j];
                }
            }
            std::vector<float> out = layer.forward(x, ids, w, kTopK, begin + b0);
            {
                MoeReceived rec;
                MoeHandle handle = phased.dispatch(x.data(), ids.data(), w.data(), n, kTopK, rec, begin + b0);
                int64_t served = 0;  // selections delivered here, each to a slot this rank holds
                for (size_t i = 0; i < rec.topk.size(); ++i) {
                    served += rec.topk[i] >= 0;
                    if (rec.topk[i] >= phased.num_local_experts() || (rec.topk[i] < 0 && rec.weights[i] != 0.0f))
                        phase_errors.push_back(cat("bad received selection ", rec.topk[i]));
                }
                std::vector<float> expert_out(static_cast<size_t>(rec.rows) * kHidden), out2(out.size());
                phased.experts(rec, expert_out.data());
                phased.combine(expert_out.data(), handle, out2.data());
                if (std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)) != 0)
                    phase_errors.push_back(cat("layer ", l, " step ", s, ": phases differ from forward"));
                if (phased.last_stats().expert_rows != served || layer.last_stats().expert_rows != served)
                    phase_errors.push_back(cat("expert_rows ", phased.last_stats().expert_rows, " != served ", served));
                served_total += static_cast<double>(served);
            }
            std::vector<float> y(kHidden), ref(kHidden);
            for (int64_t t = 0; t < n; ++t) {
                std::fill(ref.begin(), ref.end(), 0.0f);
                float scale = 0;
                for (int j = 0; j < kTopK; ++j) {
                    expert_forward_reference(all[ids[t * kTopK + j]], x.data() + t * kHidden, 1, y.data());
                    for (int h = 0; h < kHidden; ++h) ref[h] += w[t * kTopK + j] * y[h];
                    for (int h = 0; h < kHidden; ++h) scale = std::max(scale, std::fabs(w[t * kTopK + j] * y[h]));
                }
                for (int h = 0; h < kHidden; ++h)
                    max_err = std::max(max_err, static_cast<double>(std::fabs(out[t * kHidden + h] - ref[h]) / scale));
            }
            const MoeCallStats& st = layer.last_stats();
            for (int d = 0; d < G; ++d)
                matrix[static_cast<size_t>(me) * G + d] += static_cast<double>(st.dispatch_copies_to[d]);
            for (int c = 0; c < 2; ++c) {
                const LinkBytes* lb[2] = {&st.dispatch[c], &st.combine[c]};
                for (int d = 0; d < 2; ++d) {
                    sent[d * 8 + c * 4 + 0] += static_cast<double>(lb[d]->payload);
                    sent[d * 8 + c * 4 + 1] += static_cast<double>(lb[d]->metadata);
                    sent[d * 8 + c * 4 + 2] += static_cast<double>(lb[d]->control);
                    sent[d * 8 + c * 4 + 3] += static_cast<double>(lb[d]->copies);
                }
            }
        }
    }
    std::vector<double> err{max_err};
    comm.allreduce_max(err);
    comm.allreduce_sum(sent);
    comm.allreduce_sum(matrix);
    std::vector<double> phase_check{static_cast<double>(phase_errors.size()), served_total};
    comm.allreduce_sum(phase_check);

    // The evaluator's prediction (branch eval): the per-(source, destination) copy matrix of each layer.
    RoutingTrace rt;
    rt.num_tokens = T;
    rt.num_layers = kLayers;
    rt.top_k = kTopK;
    rt.num_experts = kExperts;
    rt.expert_ids = tr.ids;
    std::vector<double> eval_matrix(matrix.size(), 0.0);
    int64_t eval_copies[2] = {0, 0};
    for (int l = 0; l < kLayers; ++l) {
        const TrafficMatrix tm = count_traffic(rt, plan, policy, scheme, l, 5);
        for (size_t i = 0; i < eval_matrix.size(); ++i) eval_matrix[i] += static_cast<double>(tm.copies[i]);
        eval_copies[0] += tm.intra_node_copies;
        eval_copies[1] += tm.cross_node_copies;
    }
    // Independent prediction, over the whole trace in trace order.
    int64_t pred[2] = {0, 0};  // copies [intra, cross]
    int64_t pred_meta[2] = {0, 0};
    for (int l = 0; l < kLayers; ++l) {
        const auto c = testing_count::count_layer_copies(plan.layers[l], topo, policy, 5, tr.ids.data() + l * kTopK, T,
                                                         kTopK, kLayers * kTopK, scheme);
        for (int i = 0; i < 2; ++i) pred[i] += c.copies[i], pred_meta[i] += c.metadata_bytes[i];
    }
    bool ok = true;
    auto expect = [&](bool cond, const std::string& what) {
        if (!cond) {
            ok = false;
            why += what + "; ";
        }
    };
    for (const std::string& e : phase_errors) expect(false, e);
    expect(phase_check[0] == 0, cat(phase_check[0], " phase check(s) failed on some rank"));
    int64_t selections = 0;  // every selection of the trace is served exactly once
    for (int32_t e : tr.ids) selections += e >= 0;
    expect(phase_check[1] == static_cast<double>(selections),
           cat("dispatch delivered ", phase_check[1], " selections, the trace has ", selections));
    expect(err[0] <= 1e-5, cat("output differs from the dense reference: max rel err ", err[0]));
    const char* cls[2] = {"intra", "cross"};
    expect(matrix == eval_matrix, "per-(source, destination) copies differ from the evaluator's count_traffic");
    for (int c = 0; c < 2; ++c) {
        expect(eval_copies[c] == pred[c], cat(cls[c], " evaluator copies ", eval_copies[c], " != own count ", pred[c]));
        expect(sent[c * 4 + 3] == pred[c],
               cat(cls[c], " dispatch copies ", sent[c * 4 + 3], " != predicted ", pred[c]));
        expect(sent[c * 4 + 0] == pred[c] * kHidden * 4.0,
               cat(cls[c], " dispatch payload ", sent[c * 4 + 0], " != predicted ", pred[c] * kHidden * 4));
        expect(sent[c * 4 + 1] == pred_meta[c],
               cat(cls[c], " metadata ", sent[c * 4 + 1], " != predicted ", pred_meta[c]));
        expect(sent[8 + c * 4 + 0] == sent[c * 4 + 0],
               cat(cls[c], " combine payload ", sent[8 + c * 4], " != dispatch"));
        expect(sent[8 + c * 4 + 3] == sent[c * 4 + 3], cat(cls[c], " combine copies differ from dispatch"));
    }
    if (topo.nodes == 1) expect(sent[4 + 3] == 0, "cross-node copies on a single node");
    if (me == 0)
        std::printf("%-4s %-10s %-14s T=%-3lld batch=%-2lld copies intra=%-4.0f cross=%-4.0f max_rel_err=%.2e %s\n",
                    topo.to_string().c_str(), to_string(scheme).c_str(), to_string(policy).c_str(),
                    static_cast<long long>(T), static_cast<long long>(batch), sent[3], sent[7], err[0],
                    ok ? "ok" : "FAIL");
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s NxM\n", argv[0]);
        return 2;
    }
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    const Topology topo = Topology::parse(argv[1]);
    std::unique_ptr<Communicator> comm;
    try {
        comm = make_communicator("mpi", {topo, /*timeout_s=*/120});  // every wait below polls with a deadline
    } catch (const Error& e) {
        std::fprintf(stderr, "grace_mpi_tests: %s\n", e.what());
        return 1;
    }
    int failures = 0;
    try {
        // allgather_bytes, the backend's and the interface's default (8 bytes per allgather), on an odd size.
        std::vector<uint8_t> mine(13);
        for (size_t i = 0; i < mine.size(); ++i) mine[i] = static_cast<uint8_t>(comm->rank() * 31 + i);
        const std::vector<uint8_t> got[2] = {comm->allgather_bytes(mine.data(), mine.size()),
                                             comm->Communicator::allgather_bytes(mine.data(), mine.size())};
        for (const auto& all : got) {
            bool same = all.size() == mine.size() * comm->size();
            for (int r = 0; same && r < comm->size(); ++r)
                for (size_t i = 0; i < mine.size(); ++i)
                    same = same && all[r * mine.size() + i] == static_cast<uint8_t>(r * 31 + i);
            if (!same) {
                ++failures;
                if (comm->rank() == 0) std::printf("  FAIL: allgather_bytes\n");
            }
        }
        const ExpertPlan plan = make_plan(topo, 11);
        check_same_plan(*comm, plan);
        const Trace traces[2] = {make_trace(37, 9), make_trace(std::max(1, topo.num_gpus() - 1), 10)};
        for (const Trace& tr : traces)
            for (CommScheme scheme : {CommScheme::kFlat, CommScheme::kFlatDedup, CommScheme::kHsc})
                for (RoutingPolicy policy :
                     {RoutingPolicy::kPrimary, RoutingPolicy::kWrr, RoutingPolicy::kTar, RoutingPolicy::kVllm,
                      RoutingPolicy::kSglangStatic, RoutingPolicy::kSglangDynamic}) {
                    std::string why;
                    if (!run_case(*comm, plan, tr, scheme, policy, tr.T > 10 ? 4 : 1, why)) {
                        ++failures;
                        if (comm->rank() == 0) std::printf("  FAIL: %s\n", why.c_str());
                    }
                }
    } catch (const std::exception& e) {
        comm->abort(1, cat("grace_mpi_tests: rank ", comm->rank(), ": ", e.what()));
    }
    if (comm->rank() == 0) std::printf("%s: %d failure(s)\n", topo.to_string().c_str(), failures);
    return failures == 0 ? 0 : 1;
}
