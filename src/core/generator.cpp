// Synthetic routing traces (spec §10). The model behind every preset:
//
//   expert logit at layer l for a token of topic c:  b[d][l][e] + beta_l * [e in a group topic c prefers at l]
//
// b is the per-layer popularity of dataset d: which experts are hot is a Gaussian score, partly shared by all
// datasets and partly (weight: the domain shift) specific to d (so hot experts move between datasets as they
// do between OLMoE's domains), raised for the layer's hot block; how hot is the score's rank mapped to a normal
// quantile times sigma (capped above at hot_cap standard deviations), so every layer has the same popularity
// shape. Each layer partitions the experts into random groups, and the groups into two blocks; a topic prefers a
// few groups, mostly of one block. Members of a group meet in every topic holding their group, which makes them
// each other's top co-activation partners; the blocks give the affinity the clear two-way cut real routers show
// (GPT-OSS-20B, docs/calibration.md); topic frequencies (Zipf) and the hot block make the busiest experts.
//
// A token draws its k experts without replacement from softmax(logit): Plackett-Luce sampling, the same
// distribution as Gumbel top-k, drawn with an alias table per (layer, topic) and rejection of repeats: O(k)
// per token and layer instead of O(E) Gumbel samples (1M tokens x 48 layers x 128 experts would be 6G
// logarithms). Gate weights are the softmax over the chosen logits (renormalized top-k); ids are written in
// descending weight order, as a router writes them.
//
// A token keeps the previous token's topic with probability seq_persist (burstiness inside a sequence) and
// its previous layer's topic with probability layer_persist (inter-layer affinity).
//
// Every random number is a hash of (seed, token, layer, stream), so the output does not depend on the thread
// count or on how tokens are split. Structural parameters (popularity, groups, topics) depend on the preset
// and dataset names only, not on the seed: a seed is another sample of text from the same model.
#include "grace/generator.hpp"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "grace/error.hpp"

namespace grace {
namespace {

// ---- counter-based random numbers -------------------------------------------------------------------------

inline uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

inline uint64_t key(uint64_t a, uint64_t b) { return mix64(a ^ mix64(b)); }
inline uint64_t key(uint64_t a, uint64_t b, uint64_t c) { return key(key(a, b), c); }
inline uint64_t key(uint64_t a, uint64_t b, uint64_t c, uint64_t d) { return key(key(a, b, c), d); }

/// Uniform in [0, 1) from the top 53 bits.
inline double to_unit(uint64_t x) { return static_cast<double>(x >> 11) * 0x1.0p-53; }

uint64_t hash_name(const std::string& s) {
    uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
    return mix64(h);
}

/// Standard normal from two counter-based uniforms (Box-Muller).
double normal(uint64_t k) {
    double u1 = to_unit(mix64(k)), u2 = to_unit(mix64(k + 1));
    u1 = std::max(u1, 1e-300);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

/// Inverse of the standard normal CDF, by bisection (only used to build tables).
double normal_quantile(double q) {
    double lo = -40, hi = 40;
    for (int i = 0; i < 200 && hi - lo > 1e-12; ++i) {
        double mid = 0.5 * (lo + hi);
        (0.5 * std::erfc(-mid / std::sqrt(2.0)) < q ? lo : hi) = mid;
    }
    return 0.5 * (lo + hi);
}

/// A sequential stream of random words for one (token, layer).
struct Stream {
    uint64_t state;
    uint64_t next() {
        state += 0x9e3779b97f4a7c15ULL;
        uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
};

// ---- presets and their calibrated parameters ------------------------------------------------------------

/// The knobs of the model; docs/calibration.md says how each preset's values were chosen.
struct ModelParams {
    int num_topics;      ///< latent topics
    double zipf_s;       ///< topic frequency ~ 1 / rank^s
    double sigma_first;  ///< popularity logit std at the first layer
    double sigma_last;   ///< ... at the last layer (linear in between)
    double dataset_rho;  ///< dataset shift: weight of the dataset-specific part of the popularity and of the topic
                         ///< mixture (0 = the same for all datasets, 1 = independent); --shift overrides it
    int group_size;      ///< experts each topic prefers: one group of a per-layer random partition of the experts
    double beta_lo;      ///< logit bonus of a preferred expert: uniform in [beta_lo, beta_hi], drawn per layer
    double beta_hi;
    double layer_persist;  ///< P(topic kept from the previous layer)
    double seq_persist;    ///< P(topic kept from the previous token of the sequence)
    int groups_per_topic;  ///< groups each topic prefers (random per layer and topic)
    double hot_cap;        ///< popularity quantiles are capped at this many standard deviations: the cold tail
                           ///< gives idle experts, the hot side comes from topics (keeping partner structure)
    double block_lo;       ///< each layer's groups fall into two blocks; the smaller block's share of the groups is
    double block_hi;       ///< uniform in [block_lo, block_hi], drawn per layer
    double block_bias;     ///< P(a topic's further preferred group comes from its first group's block); 0 = none
    double block_heat;     ///< added to the popularity score of the smaller block's experts (standard deviations):
                           ///< the smaller block is the hot one, the larger one holds the cold experts
};

struct PresetEntry {
    ModelPreset shape;
    ModelParams params;
};

const std::vector<PresetEntry>& preset_table() {
    static const std::vector<PresetEntry> table = {
        // topics zipf sigma(first, last) shift group beta(lo, hi) persist(layer, seq) groups/topic hot_cap
        // block(lo, hi) block_bias block_heat
        {{"olmoe", 64, 8, 16, 2048, 1024, 0},
         {64, 1.1, 1.5, 1.6, 0.85, 2, 5.7, 6.2, 0.7, 0.5, 4, 10.0, 0.3, 0.4, 1.0, 2.0}},
        {{"deepseek-v2-lite", 64, 6, 26, 2048, 1408, 2},
         {64, 1.1, 1.3, 1.4, 0.85, 2, 4.8, 5.3, 0.7, 0.5, 3, 10.0, 0.3, 0.4, 1.0, 2.0}},
        {{"qwen3-30b-a3b", 128, 8, 48, 2048, 768, 0},
         {128, 1.1, 0.9, 1.0, 0.85, 2, 4.4, 4.7, 0.7, 0.5, 4, 10.0, 0.3, 0.4, 1.0, 2.0}},
        {{"mixtral", 8, 2, 32, 4096, 14336, 0},
         {4, 0.0, 0.27, 0.27, 0.85, 2, 2.1, 3.4, 0.7, 0.5, 1, 10.0, 0.5, 0.5, 0.0, 0.0}},
        {{"gpt-oss-20b", 32, 4, 24, 2880, 2880, 0},
         {48, 1.2, 1.3, 1.4, 0.2, 2, 4.1, 4.6, 0.7, 0.5, 3, 10.0, 0.3, 0.4, 1.0, 2.0}},
    };
    return table;
}

const PresetEntry& find_entry(const std::string& name) {
    for (const auto& e : preset_table())
        if (e.shape.name == name) return e;
    std::string known;
    for (const auto& e : preset_table()) known += (known.empty() ? "" : ", ") + e.shape.name;
    throw Error(ErrorCode::kInvalidArgument, cat("unknown preset '", name, "' (known: ", known, ")"));
}

/// Per-dataset skew: how much sharper (or flatter) its popularity is than the model's.
struct DatasetInfo {
    const char* name;
    double skew;
};
constexpr std::array<DatasetInfo, 7> kDatasets = {{
    {"wikitext", 1.0},
    {"arxiv", 1.05},
    {"github", 1.05},
    {"c4", 0.9},
    {"book", 0.95},
    {"tulu", 0.95},
    {"mixed", 1.0},
}};
constexpr int kMaxTopK = 64;

// ---- sampling tables -----------------------------------------------------------------------------------

/// Vose alias table over E outcomes; prob in [0, 1], alias an index.
/// 4 bytes, so that a layer's tables (topics x E entries) stay in L2 while a block of tokens is drawn.
struct AliasEntry {
    uint16_t keep;   ///< keep this outcome when a 16-bit uniform is below keep (out of 65536), else take alias
    uint16_t alias;  ///< the alias (this outcome itself where it is always kept)
};
struct AliasTable {
    std::vector<AliasEntry> entry;
    std::vector<float> p;  ///< normalized probabilities (for gate weights)
};

AliasTable build_alias(const std::vector<double>& w) {
    const int n = static_cast<int>(w.size());
    double total = std::accumulate(w.begin(), w.end(), 0.0);
    AliasTable t;
    std::vector<double> keep(n, 1.0);
    std::vector<int> alias(n);
    t.p.resize(n);
    std::vector<double> scaled(n);
    std::vector<int> small, large;
    for (int i = 0; i < n; ++i) {
        t.p[i] = static_cast<float>(w[i] / total);
        alias[i] = i;
        scaled[i] = w[i] / total * n;
        (scaled[i] < 1.0 ? small : large).push_back(i);
    }
    while (!small.empty() && !large.empty()) {
        int s = small.back(), l = large.back();
        small.pop_back();
        keep[s] = scaled[s];
        alias[s] = l;
        scaled[l] = (scaled[l] + scaled[s]) - 1.0;
        if (scaled[l] < 1.0) {
            large.pop_back();
            small.push_back(l);
        }
    }
    t.entry.resize(n);
    for (int i = 0; i < n; ++i) {
        double q = std::round(keep[i] * 65536.0);
        if (q >= 65536.0) alias[i] = i;  // always this outcome
        t.entry[i].keep = static_cast<uint16_t>(std::min(q, 65535.0));
        t.entry[i].alias = static_cast<uint16_t>(alias[i]);
    }
    return t;
}

struct Model {
    int E = 0, L = 0, K = 0, topics = 0;
    ModelParams params{};
    std::vector<double> topic_cdf;   // [topics]
    std::vector<AliasTable> tables;  // [layer][topic]
    const AliasTable& table(int layer, int topic) const { return tables[static_cast<size_t>(layer) * topics + topic]; }
};

Model build_model(const PresetEntry& entry, const std::string& dataset, int num_layers, double shift) {
    Model m;
    m.E = entry.shape.num_experts;
    m.K = entry.shape.top_k;
    m.L = num_layers;
    m.params = entry.params;
    m.topics = m.params.num_topics;
    const ModelParams& p = m.params;
    const uint64_t model_key = hash_name(entry.shape.name);

    int found = -1;
    for (size_t i = 0; i < kDatasets.size(); ++i)
        if (dataset == kDatasets[i].name) found = static_cast<int>(i);
    GRACE_ASSERT(found >= 0);
    const DatasetInfo& ds = kDatasets[found];

    // Topic preferences per layer: a random partition of the experts into groups of group_size; topic c
    // prefers groups_per_topic groups (the first is c mod the number of groups, the others random). Members
    // of a group meet in every topic holding the group, other experts only in topics holding both groups, so
    // group members are each other's top partners (as Qwen1.5-MoE's partner ranks show). The groups fall into
    // two blocks of random sizes, and a topic's further groups come from its first group's block with
    // probability block_bias: the coarse two-way structure of real routers (GPT-OSS-20B's affinity has a clear
    // two-way cut whose smaller side holds 19-50% of the experts), without which spectral grouping's two-way
    // split cuts off a handful of loosely tied experts.
    std::vector<std::vector<uint8_t>> prefers(static_cast<size_t>(m.L) * m.topics, std::vector<uint8_t>(m.E, 0));
    std::vector<double> beta(m.L);
    std::vector<std::vector<uint8_t>> in_small_block(m.L, std::vector<uint8_t>(m.E, 0));
    const int group = std::clamp(p.group_size, 1, m.E), num_groups = m.E / group;
    for (int l = 0; l < m.L; ++l) {
        std::vector<int> ids(m.E);
        std::iota(ids.begin(), ids.end(), 0);
        Stream s{key(model_key, 0x70, l)};
        for (int i = m.E - 1; i > 0; --i) std::swap(ids[i], ids[s.next() % static_cast<uint64_t>(i + 1)]);
        beta[l] = p.beta_lo + (p.beta_hi - p.beta_lo) * to_unit(s.next());
        // Groups [0, cut) form block 0, [cut, num_groups) block 1 (the ids are shuffled, so block 0 is random).
        Stream bs{key(model_key, 0x73, l)};
        const double share = p.block_lo + (p.block_hi - p.block_lo) * to_unit(bs.next());
        const int cut = std::clamp(static_cast<int>(std::lround(share * num_groups)), 1, std::max(1, num_groups - 1));
        for (int i = 0; i < cut * group; ++i) in_small_block[l][ids[i]] = 1;
        for (int c = 0; c < m.topics; ++c) {
            const int first = c % num_groups;
            const int lo = first < cut ? 0 : cut, hi = first < cut ? cut : num_groups;
            for (int h = 0; h < std::max(1, p.groups_per_topic); ++h) {
                int g = first;
                if (h > 0) {
                    g = static_cast<int>(s.next() % static_cast<uint64_t>(num_groups));
                    if (to_unit(bs.next()) < p.block_bias) g = lo + static_cast<int>(bs.next() % (hi - lo));
                }
                for (int i = 0; i < group; ++i) prefers[static_cast<size_t>(l) * m.topics + c][ids[g * group + i]] = 1;
            }
        }
    }

    m.tables.reserve(static_cast<size_t>(m.L) * m.topics);
    {
        const uint64_t ds_key = hash_name(ds.name);
        // Topic frequencies: Zipf over a permutation of the topics; shift mixes the dataset's own permutation
        // (weight shift) with one shared by every dataset (weight 1 - shift), so shift 0 gives every dataset the
        // same mixture and shift 1 independent ones.
        auto zipf_over_permutation = [&](uint64_t stream_key) {
            std::vector<int> perm(m.topics);
            std::iota(perm.begin(), perm.end(), 0);
            Stream ps{stream_key};
            for (int i = m.topics - 1; i > 0; --i) std::swap(perm[i], perm[ps.next() % static_cast<uint64_t>(i + 1)]);
            std::vector<double> f(m.topics);
            double total = 0;
            for (int r = 0; r < m.topics; ++r) total += f[perm[r]] = 1.0 / std::pow(r + 1.0, p.zipf_s);
            for (double& x : f) x /= total;
            return f;
        };
        const double rho = shift, shared = std::sqrt(1.0 - rho * rho);
        std::vector<double> freq = zipf_over_permutation(key(model_key, ds_key, 0x71));
        if (rho < 1.0) {
            const std::vector<double> common = zipf_over_permutation(key(model_key, 0x74));
            for (int c = 0; c < m.topics; ++c) freq[c] = rho * freq[c] + (1.0 - rho) * common[c];
        }
        std::vector<double> cdf(m.topics);
        std::partial_sum(freq.begin(), freq.end(), cdf.begin());
        for (double& x : cdf) x /= cdf.back();
        cdf.back() = 1.0;
        m.topic_cdf = cdf;

        for (int l = 0; l < m.L; ++l) {
            double frac = m.L > 1 ? static_cast<double>(l) / (m.L - 1) : 0.0;
            double sigma = (p.sigma_first + (p.sigma_last - p.sigma_first) * frac) * ds.skew;
            // Which experts are hot: a Gaussian score partly shared by all datasets; how hot: the score's rank
            // mapped to a normal quantile, so the shape of the popularity is the same in every layer (the
            // spread then follows sigma, which keeps every layer inside the calibrated range).
            std::vector<double> score(m.E), b(m.E);
            for (int e = 0; e < m.E; ++e)
                score[e] = shared * normal(key(model_key, 0x72, l, e)) + rho * normal(key(model_key, ds_key, l, e)) +
                           p.block_heat * in_small_block[l][e];
            std::vector<int> order(m.E);
            std::iota(order.begin(), order.end(), 0);
            std::sort(order.begin(), order.end(),
                      [&](int x, int y) { return score[x] < score[y] || (score[x] == score[y] && x < y); });
            for (int r = 0; r < m.E; ++r) b[order[r]] = sigma * std::min(p.hot_cap, normal_quantile((r + 0.5) / m.E));
            for (int c = 0; c < m.topics; ++c) {
                const auto& pref = prefers[static_cast<size_t>(l) * m.topics + c];
                std::vector<double> w(m.E);
                double mx = -1e300;
                for (int e = 0; e < m.E; ++e) mx = std::max(mx, b[e] + beta[l] * pref[e]);
                for (int e = 0; e < m.E; ++e) w[e] = std::exp(b[e] + beta[l] * pref[e] - mx);
                m.tables.push_back(build_alias(w));
            }
        }
    }
    return m;
}

inline int draw_topic(const std::vector<double>& cdf, double u) {
    return static_cast<int>(std::upper_bound(cdf.begin(), cdf.end() - 1, u) - cdf.begin());
}

// Stream tags, so that the uses of the counter never collide.
enum : uint64_t { kTagSeqCoin = 1, kTagTopic = 2, kTagLayerCoin = 3, kTagExperts = 4 };

/// The topic the sequence process gives token t at layer l: walk back to the last renewal inside the sequence.
int sequence_topic(uint64_t seed, int64_t t, int64_t seq_start, int l, const ModelParams& p,
                   const std::vector<double>& cdf) {
    int64_t j = t;
    while (j > seq_start && to_unit(key(seed, kTagSeqCoin, static_cast<uint64_t>(j), l)) < p.seq_persist) --j;
    return draw_topic(cdf, to_unit(key(seed, kTagTopic, static_cast<uint64_t>(j), l)));
}

/// Draws k distinct experts (Plackett-Luce by rejection of repeats) into ids/weights, descending weight.
inline void draw_experts(const AliasTable& tab, int E, int k, Stream& s, int32_t* ids, float* weights) {
    const AliasEntry* entry = tab.entry.data();
    const float* prob = tab.p.data();
    int32_t got[kMaxTopK];
    float gp[kMaxTopK];
    int n = 0;
    int tries = 0;
    while (n < k) {
        uint64_t r = s.next();
        int i = static_cast<int>(((r >> 32) * static_cast<uint64_t>(E)) >> 32);
        const AliasEntry a = entry[i];
        const int e = (r & 0xffffu) < a.keep ? i : a.alias;
        bool repeat = false;
        for (int j = 0; j < n; ++j) repeat |= got[j] == e;
        if (!repeat) {
            got[n++] = e;
        } else if (++tries > 64 * k) {
            // Pathological mass on few experts: finish exactly by sequential sampling over what remains.
            while (n < k) {
                double rest = 0;
                for (int c = 0; c < E; ++c) {
                    bool used = false;
                    for (int j = 0; j < n; ++j) used |= got[j] == c;
                    if (!used) rest += prob[c];
                }
                double target = to_unit(s.next()) * rest, acc = 0;
                int pick = -1;
                for (int c = 0; c < E; ++c) {
                    bool used = false;
                    for (int j = 0; j < n; ++j) used |= got[j] == c;
                    if (used) continue;
                    pick = c;
                    acc += prob[c];
                    if (acc > target) break;
                }
                got[n++] = pick;
            }
        }
    }
    // Descending probability (stable over draw order), weights renormalized over the chosen experts.
    for (int a = 0; a < k; ++a) gp[a] = prob[got[a]];
    for (int a = 1; a < k; ++a) {
        int32_t e = got[a];
        float pe = gp[a];
        int b = a;
        while (b > 0 && gp[b - 1] < pe) {
            got[b] = got[b - 1];
            gp[b] = gp[b - 1];
            --b;
        }
        got[b] = e;
        gp[b] = pe;
    }
    float sum = 0;
    for (int j = 0; j < k; ++j) {
        ids[j] = got[j];
        sum += gp[j];
    }
    if (weights)
        for (int j = 0; j < k; ++j) weights[j] = gp[j] / sum;
}

}  // namespace

const std::vector<ModelPreset>& model_presets() {
    static const std::vector<ModelPreset> presets = [] {
        std::vector<ModelPreset> v;
        for (const auto& e : preset_table()) v.push_back(e.shape);
        return v;
    }();
    return presets;
}

const ModelPreset& find_preset(const std::string& name) { return find_entry(name).shape; }

const std::vector<std::string>& generator_datasets() {
    static const std::vector<std::string> names = [] {
        std::vector<std::string> v;
        for (const auto& d : kDatasets) v.emplace_back(d.name);
        return v;
    }();
    return names;
}

RoutingTrace generate_trace(const GeneratorOptions& options) {
    const PresetEntry& entry = find_entry(options.preset);
    const auto& datasets = generator_datasets();
    if (std::find(datasets.begin(), datasets.end(), options.dataset) == datasets.end()) {
        std::string known;
        for (const auto& d : datasets) known += (known.empty() ? "" : ", ") + d;
        GRACE_CHECK_ARG(false, "unknown dataset '", options.dataset, "' (known: ", known, ")");
    }
    GRACE_CHECK_ARG(options.num_tokens >= 1, "number of tokens must be at least 1, got ", options.num_tokens);
    GRACE_CHECK_ARG(options.num_layers >= 0, "number of layers must be >= 0 (0 = the preset's), got ",
                    options.num_layers);
    GRACE_CHECK_ARG(options.sequence_length >= 1, "sequence length must be at least 1, got ", options.sequence_length);
    GRACE_CHECK_ARG(options.domain_shift < 0 || options.domain_shift <= 1,
                    "domain shift must be in [0, 1] (negative = the preset's), got ", options.domain_shift);
    GRACE_CHECK_ARG(options.num_threads >= 0, "number of threads must be >= 0 (0 = all), got ", options.num_threads);

    const int L = options.num_layers > 0 ? options.num_layers : entry.shape.num_layers;
    const double shift = options.domain_shift >= 0 ? options.domain_shift : entry.params.dataset_rho;
    const Model model = build_model(entry, options.dataset, L, shift);
    const int E = model.E, k = model.K;
    const int64_t T = options.num_tokens;
    GRACE_CHECK_ARG(T <= (int64_t{1} << 40) / (static_cast<int64_t>(L) * k), "too many tokens: ", T);

    RoutingTrace trace;
    trace.num_tokens = T;
    trace.num_layers = L;
    trace.top_k = k;
    trace.num_experts = E;
    trace.model = entry.shape.name;
    trace.dataset = options.dataset;
    trace.expert_ids.resize(static_cast<size_t>(T) * L * k);
    if (options.with_weights) trace.gate_weights.resize(trace.expert_ids.size());

    const uint64_t seed = mix64(options.seed ^ 0x6a09e667f3bcc908ULL);
    const int64_t seq_len = options.sequence_length;
    const ModelParams& p = model.params;
    const int threads = options.num_threads > 0 ? options.num_threads : omp_get_max_threads();
    int32_t* ids_out = trace.expert_ids.data();
    float* w_out = options.with_weights ? trace.gate_weights.data() : nullptr;

    // Blocks of tokens, layer by layer inside a block, so that one layer's tables stay in cache.
    constexpr int64_t kBlock = 1024;
    const int64_t num_blocks = (T + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
        const int64_t t0 = blk * kBlock, t1 = std::min(T, t0 + kBlock);
        int topic[kBlock];
        for (int l = 0; l < L; ++l) {
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t seq_start = (t / seq_len) * seq_len;
                int& tp = topic[t - t0];
                if (l == 0 || to_unit(key(seed, kTagLayerCoin, static_cast<uint64_t>(t), l)) >= p.layer_persist)
                    tp = sequence_topic(seed, t, seq_start, l, p, model.topic_cdf);
                Stream s{key(seed, kTagExperts, static_cast<uint64_t>(t), l)};
                const size_t off = (static_cast<size_t>(t) * L + l) * k;
                draw_experts(model.table(l, tp), E, k, s, ids_out + off, w_out ? w_out + off : nullptr);
            }
        }
    }
    return trace;
}

}  // namespace grace
