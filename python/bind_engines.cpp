// Bindings of the engines' replica choice (engine_routing.hpp): CPython's random.Random reproduced in C++, and
// SGLang's static dispatch tables, so that tests can hold them against Python's own random module.
#include "bind_common.hpp"
#include "grace/engine_routing.hpp"
#include "grace/error.hpp"

namespace grace::py_bind {

void bind_engines(py::module_& m) {
    m.def(
        "py_random_draws",
        [](uint64_t seed, const std::vector<std::vector<int64_t>>& ops) {
            // Each op: [0, k] getrandbits(k); [1, n] randbelow(n); [2, n] shuffle(range(n)); [3, n, k]
            // sample(range(n), k). Returns one list per op.
            PyRandom rng(seed);
            py::list out;
            for (const auto& op : ops) {
                GRACE_CHECK_ARG(!op.empty() && op[0] >= 0 && op[0] <= 3 && op.size() == (op[0] == 3 ? 3u : 2u),
                                "bad draw op");
                py::list r;
                if (op[0] == 0) {
                    r.append(rng.getrandbits(static_cast<int>(op[1])));
                } else if (op[0] == 1) {
                    r.append(rng.randbelow(op[1]));
                } else {
                    GRACE_CHECK_ARG(op[1] >= 0 && op[1] <= (1 << 20), "population size ", op[1], " out of range");
                    std::vector<int> x(static_cast<size_t>(op[1]));
                    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<int>(i);
                    if (op[0] == 2)
                        rng.shuffle(x);
                    else
                        x = rng.sample(x, static_cast<int>(op[2]));
                    for (int v : x) r.append(v);
                }
                out.append(r);
            }
            return out;
        },
        py::arg("seed"), py::arg("ops"),
        "Draws from grace's C++ copy of random.Random(seed): ops [[0,k]] getrandbits, [[1,n]] randbelow, [[2,n]] "
        "shuffle(list(range(n))), [[3,n,k]] sample(range(n), k). For checks against Python's random module.");
    m.def(
        "sglang_dispatch_tables",
        [](const py::object& phy2log, int num_experts, const py::object& topology, bool nearest, uint64_t seed) {
            std::vector<int64_t> shape;
            const std::vector<int64_t> v = int_values(phy2log, "phy2log", {2}, &shape);
            const Topology topo = topology_from_py(topology);
            const int G = topo.num_gpus();
            const int64_t L = shape[0], P = shape[1];
            GRACE_CHECK_ARG(P % G == 0, "phy2log has ", P, " slots, not a multiple of the ", G, " GPUs");
            std::vector<SlotMap> maps(static_cast<size_t>(L));
            for (int64_t l = 0; l < L; ++l)
                for (int64_t p = 0; p < P; ++p) {
                    maps[l].slot_expert.push_back(static_cast<int>(v[l * P + p]));
                    maps[l].slot_gpu.push_back(static_cast<int>(p / (P / G)));
                }
            const auto t = sglang_dispatch_tables(maps, num_experts, topo, nearest, seed);
            return to_array(std::vector<int32_t>(t.begin(), t.end()), {L, G, num_experts});
        },
        py::arg("phy2log"), py::arg("num_experts"), py::arg("topology"), py::arg("nearest") = false,
        py::arg("seed") = 42,
        "SGLang's static dispatch tables [L, G, E] (physical slot per layer, rank, expert) for a physical map "
        "phy2log [L, P] with P / G slots per GPU; nearest=True: the _find_nearest_expert variant.");
}

}  // namespace grace::py_bind
