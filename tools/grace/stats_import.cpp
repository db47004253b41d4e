// `grace import-stats`: aggregated co-activation (and loads), e.g. C2R's or SGLang's, -> statistics folder.
#include <cstdio>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"
#include "grace/stats.hpp"

namespace grace::cli {
namespace {

std::function<int()> setup_import(CLI::App& sub) {
    struct Args {
        std::string coact, load, out, model, dataset;
        bool ordered = false;
        int top_k = 0;
    };
    auto a = std::make_shared<Args>();
    sub.add_option("--coactivation", a->coact, "Co-activation .npy [L, E, E] or [E, E] (diagonal ignored)")->required();
    sub.add_option("--load", a->load, "Per-expert loads .npy [L, E] or [E] (default: row sums of A / (k-1))");
    sub.add_flag("--ordered-pairs", a->ordered,
                 "Entries count each pair twice (2*A): halve them; an odd entry is an error");
    sub.add_option("--top-k", a->top_k, "Top-k of the routing the counts came from")
        ->required()
        ->check(integer_in<int>(1));
    sub.add_option("--model", a->model, "Model name recorded in meta.json");
    sub.add_option("--dataset", a->dataset, "Dataset name recorded in meta.json");
    sub.add_option("-o,--output", a->out, "Output statistics folder (new, empty, or an earlier grace stats folder)")
        ->required();
    return [a] {
        std::string out = a->out;
        while (out.size() > 1 && out.back() == '/') out.pop_back();
        check_output_folder(out, "stats");
        RoutingStats st = import_aggregates(a->coact, a->load, a->ordered, a->top_k);
        st.model = a->model;
        st.dataset = a->dataset;
        save_stats(st, out);
        std::printf("imported %s: L=%d E=%d k=%d T=%lld -> %s\n", a->coact.c_str(), st.num_layers, st.num_experts,
                    st.top_k, static_cast<long long>(st.num_tokens), out.c_str());
        return 0;
    };
}

GRACE_COMMAND("import-stats", "Build statistics from aggregated co-activation counts", setup_import, 25);

}  // namespace
}  // namespace grace::cli
