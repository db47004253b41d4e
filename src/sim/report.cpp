// The comparison report: SVG figures written directly (no Python at run time) and one report.html.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "grace/compare.hpp"
#include "grace/error.hpp"
#include "grace/io.hpp"

namespace grace {

namespace {

std::string esc(const std::string& s) {
    std::string o;
    for (char c : s) {
        if (c == '<')
            o += "&lt;";
        else if (c == '>')
            o += "&gt;";
        else if (c == '&')
            o += "&amp;";
        else if (c == '"')
            o += "&quot;";
        else
            o += c;
    }
    return o;
}

std::string num(double v, int prec = 2) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", prec, v);
    return buf;
}

// Short human figure: 1234567 -> "1.23M".
std::string human(double v) {
    const char* suffix[] = {"", "k", "M", "G", "T"};
    int i = 0;
    while (std::fabs(v) >= 1000 && i < 4) v /= 1000, ++i;
    char buf[32];
    std::snprintf(buf, sizeof buf, i ? "%.3g%s" : "%.4g%s", v, suffix[i]);
    return buf;
}

class Svg {
  public:
    Svg(double w, double h) : w_(w), h_(h) {}
    void rect(double x, double y, double w, double h, const std::string& fill, const std::string& extra = "") {
        body_ += "<rect x=\"" + num(x) + "\" y=\"" + num(y) + "\" width=\"" + num(std::max(w, 0.0)) + "\" height=\"" +
                 num(std::max(h, 0.0)) + "\" fill=\"" + fill + "\" " + extra + "/>\n";
    }
    void line(double x1, double y1, double x2, double y2, const std::string& stroke, double width = 1,
              const std::string& extra = "") {
        body_ += "<line x1=\"" + num(x1) + "\" y1=\"" + num(y1) + "\" x2=\"" + num(x2) + "\" y2=\"" + num(y2) +
                 "\" stroke=\"" + stroke + "\" stroke-width=\"" + num(width) + "\" " + extra + "/>\n";
    }
    void text(double x, double y, const std::string& s, double size = 12, const std::string& anchor = "start",
              const std::string& extra = "") {
        body_ += "<text x=\"" + num(x) + "\" y=\"" + num(y) + "\" font-size=\"" + num(size, 1) + "\" text-anchor=\"" +
                 anchor + "\" " + extra + ">" + esc(s) + "</text>\n";
    }
    void raw(const std::string& s) { body_ += s; }
    std::string str() const {
        return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + num(w_, 0) + "\" height=\"" + num(h_, 0) +
               "\" viewBox=\"0 0 " + num(w_, 0) + " " + num(h_, 0) +
               "\" font-family=\"Helvetica, Arial, sans-serif\">\n<rect width=\"100%\" height=\"100%\" "
               "fill=\"white\"/>\n" +
               body_ + "</svg>\n";
    }

  private:
    double w_, h_;
    std::string body_;
};

// White (0) to dark blue (1).
std::string blues(double v) {
    v = std::clamp(v, 0.0, 1.0);
    const int r = static_cast<int>(255 + (8 - 255) * v), g = static_cast<int>(255 + (48 - 255) * v),
              b = static_cast<int>(255 + (107 - 255) * v);
    char col[16];
    std::snprintf(col, sizeof col, "#%02x%02x%02x", r, g, b);
    return col;
}

const char* kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};

// Horizontal stacked bars, one panel per group (topology). values[group][category][series].
std::string stacked_bars(const std::string& title, const std::vector<std::string>& groups,
                         const std::vector<std::vector<std::string>>& categories,
                         const std::vector<std::string>& series, const std::vector<const char*>& colors,
                         const std::vector<std::vector<std::vector<double>>>& values, const std::string& unit) {
    const double left = 120, right = 90, bar_h = 18, gap = 6, panel_title = 26, top = 50, width = 760;
    double height = top + 30;
    for (const auto& c : categories) height += panel_title + c.size() * (bar_h + gap) + 16;
    Svg svg(width, height);
    svg.text(width / 2, 22, title, 15, "middle", "font-weight=\"bold\"");
    // Legend.
    double lx = left;
    for (size_t s = 0; s < series.size(); ++s) {
        svg.rect(lx, 32, 12, 12, colors[s]);
        svg.text(lx + 16, 42, series[s], 11);
        lx += 24 + 7.0 * series[s].size();
    }
    double y = top + 10;
    for (size_t g = 0; g < groups.size(); ++g) {
        double mx = 0;
        for (const auto& v : values[g]) {
            double sum = 0;
            for (double x : v) sum += x;
            mx = std::max(mx, sum);
        }
        if (mx <= 0) mx = 1;
        const double plot_w = width - left - right;
        svg.text(left, y + 16, groups[g], 13, "start", "font-weight=\"bold\"");
        y += panel_title;
        for (size_t c = 0; c < categories[g].size(); ++c) {
            svg.text(left - 6, y + bar_h - 5, categories[g][c], 11, "end");
            double x = left, sum = 0;
            for (size_t s = 0; s < series.size(); ++s) {
                const double w = values[g][c][s] / mx * plot_w;
                svg.rect(x, y, w, bar_h, colors[s]);
                x += w;
                sum += values[g][c][s];
            }
            svg.text(x + 4, y + bar_h - 5, human(sum) + unit, 10);
            y += bar_h + gap;
        }
        svg.line(left, y - gap + 2, left, y - gap - categories[g].size() * (bar_h + gap), "#444");
        y += 16;
    }
    return svg.str();
}

// Affinity matrix of one layer with experts ordered by their primary GPU; thin borders between GPU groups,
// thick ones between nodes.
std::string affinity_figure(const RoutingStats& stats, const ExpertPlan& plan, int layer, const std::string& label) {
    const int E = stats.num_experts, G = plan.topology.num_gpus(), M = plan.topology.gpus_per_node;
    const LayerPlan& lp = plan.layers[layer];
    std::vector<int> order;
    std::vector<int> group_end;
    for (int g = 0; g < G; ++g) {
        std::vector<int> mine;
        for (int e = 0; e < E; ++e)
            if (lp.primary_gpu[e] == g) mine.push_back(e);
        std::sort(mine.begin(), mine.end(), [&](int a, int b) {
            return stats.load_at(layer, a) != stats.load_at(layer, b)
                       ? stats.load_at(layer, a) > stats.load_at(layer, b)
                       : a < b;
        });
        order.insert(order.end(), mine.begin(), mine.end());
        group_end.push_back(static_cast<int>(order.size()));
    }
    const double size = 560, cell = size / E, left = 60, top = 60;
    Svg svg(left + size + 120, top + size + 50);
    svg.text((left + size) / 2 + 30, 24,
             "Affinity A_ij, layer " + std::to_string(layer) + ", experts ordered by GPU group", 15, "middle",
             "font-weight=\"bold\"");
    svg.text((left + size) / 2 + 30, 44, label, 12, "middle");
    const int64_t* a = stats.layer_affinity(layer);
    // Linear white-to-blue scale clipped at the 99th percentile, so a few huge pairs do not wash out the rest.
    std::vector<int64_t> off;
    for (int i = 0; i < E; ++i)
        for (int j = 0; j < E; ++j)
            if (i != j) off.push_back(a[static_cast<size_t>(i) * E + j]);
    std::sort(off.begin(), off.end());
    const double mx = std::max<double>(1, off.empty() ? 1 : off[off.size() * 99 / 100]);
    for (int r = 0; r < E; ++r)
        for (int c = 0; c < E; ++c) {
            const double v = std::min(1.0, static_cast<double>(a[static_cast<size_t>(order[r]) * E + order[c]]) / mx);
            if (v <= 0.01) continue;
            svg.rect(left + c * cell, top + r * cell, cell + 0.3, cell + 0.3, blues(v));
        }
    svg.rect(left, top, size, size, "none", "stroke=\"#333\" stroke-width=\"1\"");
    int begin = 0;
    for (int g = 0; g < G; ++g) {
        const int end = group_end[g];
        const bool node_border = (g + 1) % M == 0 && g + 1 < G;
        if (g + 1 < G) {
            const double p = end * cell;
            const std::string col = node_border ? "#d62728" : "#555";
            const double w = node_border ? 2.5 : 1;
            svg.line(left + p, top, left + p, top + size, col, w);
            svg.line(left, top + p, left + size, top + p, col, w);
        }
        svg.text(left - 6, top + (begin + end) / 2.0 * cell + 4, "GPU " + std::to_string(g), 10, "end");
        svg.text(left + (begin + end) / 2.0 * cell, top + size + 16, std::to_string(end - begin), 10, "middle");
        begin = end;
    }
    svg.text(left + size / 2, top + size + 34, "group sizes (red lines: node borders)", 11, "middle");
    // Colour bar.
    for (int i = 0; i < 50; ++i) svg.rect(left + size + 30, top + i * 6, 16, 6.3, blues(1 - i / 49.0));
    svg.text(left + size + 50, top + 10, ">= " + human(mx), 10);
    svg.text(left + size + 50, top + 300, "0", 10);
    svg.text(left + size + 30, top + 318, "(tokens, clipped", 10);
    svg.text(left + size + 30, top + 332, " at 99th pct.)", 10);
    return svg.str();
}

// Grouped bars: per-GPU load of one layer for several rows (e.g. before/after replication).
std::string load_figure(const std::vector<std::pair<std::string, std::vector<int64_t>>>& bars, int layer,
                        const std::string& label) {
    const int G = bars.empty() ? 0 : static_cast<int>(bars[0].second.size());
    const double left = 70, top = 70, plot_h = 300, plot_w = 620;
    Svg svg(left + plot_w + 30, top + plot_h + 60);
    svg.text((left + plot_w) / 2 + 20, 24,
             "Per-GPU load, layer " + std::to_string(layer) + ": before and after replication", 15, "middle",
             "font-weight=\"bold\"");
    svg.text((left + plot_w) / 2 + 20, 42, label, 12, "middle");
    double mx = 1;
    for (const auto& b : bars)
        for (int64_t v : b.second) mx = std::max(mx, static_cast<double>(v));
    mx *= 1.1;
    for (int t = 0; t <= 4; ++t) {
        const double y = top + plot_h - plot_h * t / 4.0;
        svg.line(left, y, left + plot_w, y, "#ddd");
        svg.text(left - 6, y + 4, human(mx * t / 4.0), 10, "end");
    }
    const double slot = plot_w / std::max(G, 1), bw = slot * 0.8 / std::max<size_t>(bars.size(), 1);
    for (size_t s = 0; s < bars.size(); ++s) {
        double mean = 0;
        for (int g = 0; g < G; ++g) {
            const double v = static_cast<double>(bars[s].second[g]);
            mean += v / G;
            const double h = v / mx * plot_h;
            svg.rect(left + g * slot + slot * 0.1 + s * bw, top + plot_h - h, bw - 1, h, kPalette[s % 8]);
        }
        const double my = top + plot_h - mean / mx * plot_h;
        svg.line(left, my, left + plot_w, my, kPalette[s % 8], 1.2, "stroke-dasharray=\"5,4\"");
        svg.rect(left + 10 + s * 200, top - 20, 12, 12, kPalette[s % 8]);
        svg.text(left + 26 + s * 200, top - 10, bars[s].first + " (dashed: mean)", 11);
    }
    for (int g = 0; g < G; ++g)
        svg.text(left + g * slot + slot / 2, top + plot_h + 16, "GPU " + std::to_string(g), 10, "middle");
    svg.line(left, top + plot_h, left + plot_w, top + plot_h, "#333");
    svg.text(left + plot_w / 2, top + plot_h + 40, "selections (token-expert pairs) processed per GPU", 11, "middle");
    return svg.str();
}

// U against D for each node's controlled grouping; the chosen point (r closest to r*) is circled.
std::string knee_figure(const LayerPlan& lp, const std::string& label) {
    const double left = 70, top = 60, plot = 420;
    Svg svg(left + plot + 190, top + plot + 60);
    svg.text((left + plot) / 2 + 60, 24, "Knee curve U(P_r) vs D(P_r), layer " + std::to_string(lp.layer), 15, "middle",
             "font-weight=\"bold\"");
    svg.text((left + plot) / 2 + 60, 42, label, 12, "middle");
    double dmax = 0.1, umin = 1, umax = 0;
    for (const auto& curve : lp.knee_curves)
        for (const auto& p : curve) dmax = std::max(dmax, p.d), umin = std::min(umin, p.u), umax = std::max(umax, p.u);
    if (umax <= umin) umin = 0, umax = 1;
    const double pad = (umax - umin) * 0.08;
    umin -= pad, umax += pad;
    auto X = [&](double d) { return left + d / dmax * plot; };
    auto Y = [&](double u) { return top + plot - (u - umin) / (umax - umin) * plot; };
    for (int t = 0; t <= 4; ++t) {
        svg.line(left, top + plot * t / 4.0, left + plot, top + plot * t / 4.0, "#eee");
        svg.text(left - 6, top + plot - plot * t / 4.0 + 4, num(umin + (umax - umin) * t / 4.0, 3), 10, "end");
        svg.text(left + plot * t / 4.0, top + plot + 16, num(dmax * t / 4.0, 2), 10, "middle");
    }
    svg.rect(left, top, plot, plot, "none", "stroke=\"#333\"");
    for (size_t n = 0; n < lp.knee_curves.size(); ++n) {
        const auto& curve = lp.knee_curves[n];
        if (curve.empty()) continue;
        std::string pts;
        size_t knee = 0;
        for (size_t i = 0; i < curve.size(); ++i) {
            pts += num(X(curve[i].d)) + "," + num(Y(curve[i].u)) + " ";
            if (std::fabs(curve[i].r - lp.r_star) < std::fabs(curve[knee].r - lp.r_star)) knee = i;
        }
        const char* col = kPalette[n % 8];
        svg.raw("<polyline points=\"" + pts + "\" fill=\"none\" stroke=\"" + col + "\" stroke-width=\"1.8\"/>\n");
        for (const auto& p : curve)
            svg.raw("<circle cx=\"" + num(X(p.d)) + "\" cy=\"" + num(Y(p.u)) + "\" r=\"3\" fill=\"" + col + "\"/>\n");
        svg.raw("<circle cx=\"" + num(X(curve[knee].d)) + "\" cy=\"" + num(Y(curve[knee].u)) +
                "\" r=\"8\" fill=\"none\" stroke=\"black\" stroke-width=\"2\"/>\n");
        svg.rect(left + plot + 20, top + 10 + n * 20, 12, 12, col);
        svg.text(left + plot + 36, top + 20 + n * 20,
                 "node " + std::to_string(n) + " (" + std::to_string(curve.size()) + " r values)", 11);
    }
    svg.text(left + plot + 20, top + 20 + lp.knee_curves.size() * 20 + 10, "circle: knee, r* = " + num(lp.r_star, 3),
             11);
    svg.text(left + plot / 2, top + plot + 40, "size deviation D (Eq. 2)", 12, "middle");
    svg.text(18, top + plot / 2, "intra-group affinity U (Eq. 1)", 12, "middle",
             "transform=\"rotate(-90 18 " + num(top + plot / 2) + ")\"");
    return svg.str();
}

std::string pct(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%+.1f%%", 100 * v);
    return buf;
}

std::vector<Topology> topologies_of(const CompareResult& r) {
    std::vector<Topology> t;
    for (const auto& e : r.entries)
        if (std::find(t.begin(), t.end(), e.topology) == t.end()) t.push_back(e.topology);
    return t;
}

struct Figures {
    std::vector<std::pair<std::string, std::string>> files;  // (file name, caption)
};

Figures write_figures(const CompareResult& r, const std::string& dir, const std::string& prefix, OutputSet& out) {
    Figures f;
    const auto topos = topologies_of(r);
    auto put = [&](const std::string& name, const std::string& svg, const std::string& caption) {
        out.add_text((std::filesystem::path(dir) / (prefix + name)).string(), svg);
        f.files.push_back({prefix + name, caption});
    };
    // Plan figures on the largest topology, on the layer whose grouping is the most skewed.
    const Topology& big = topos.back();
    const CompareEntry* grace = r.find("+DR+TAR", big);
    const CompareEntry* hg = r.find("HG+HSC", big);
    if (grace) {
        const ExpertPlan& plan = r.plans[grace->plan_index];
        int layer = 0;
        for (const auto& lp : plan.layers)
            if (lp.gamma > plan.layers[layer].gamma) layer = lp.layer;
        const std::string label =
            r.model + " / " + r.profile_dataset + ", " + big.to_string() + ", plan " + plan.method;
        put("affinity.svg", affinity_figure(r.stats, plan, layer, label),
            "Affinity matrix of layer " + std::to_string(layer) +
                " (the most skewed after grouping), experts ordered by "
                "their GRACE GPU group; red lines separate nodes. Dense diagonal blocks are co-activated experts kept "
                "together.");
        std::vector<std::pair<std::string, std::vector<int64_t>>> bars;
        if (hg) bars.push_back({"HG (no replicas)", hg->report.layers[layer].gpu_load});
        if (const CompareEntry* wrr = r.find("+DR+WRR", big))
            bars.push_back({"+DR+WRR", wrr->report.layers[layer].gpu_load});
        bars.push_back({"+DR+TAR", grace->report.layers[layer].gpu_load});
        put("load.svg", load_figure(bars, layer, label + ", measured on " + r.dataset),
            "Per-GPU load of layer " + std::to_string(layer) +
                " measured by replay, before (HG) and after dynamic "
                "replication (gamma = " +
                num(plan.layers[layer].gamma, 2) + ", R = " + std::to_string(plan.layers[layer].num_replicas) + ").");
        if (!plan.layers[layer].knee_curves.empty())
            put("knee.svg", knee_figure(plan.layers[layer], label),
                "U/D curve of the level-2 (GPU) grouping inside each node, layer " + std::to_string(layer) +
                    "; the circled point is the knee (r*).");
    }
    std::vector<std::string> groups;
    std::vector<std::vector<std::string>> cats;
    std::vector<std::vector<std::vector<double>>> traffic, time;
    for (const auto& t : topos) {
        groups.push_back(r.model + " on " + t.to_string());
        cats.emplace_back();
        traffic.emplace_back();
        time.emplace_back();
        for (const auto& e : r.entries) {
            if (!(e.topology == t)) continue;
            const EvalMetrics& m = e.report.total;
            cats.back().push_back(e.row.name);
            traffic.back().push_back(
                {static_cast<double>(m.cross_node_bytes), static_cast<double>(m.intra_node_bytes)});
            time.back().push_back({m.all_to_all_time_s, m.mean_compute_time_s, m.gpu_idle_time_s});
        }
    }
    put("traffic.svg",
        stacked_bars("Token traffic per direction, summed over layers", groups, cats,
                     {"cross-node bytes", "intra-node bytes"}, {"#d62728", "#1f77b4"}, traffic, "B"),
        "Traffic breakdown per method: cross-node and intra-node bytes of the dispatch (the combine sends the same).");
    put("time.svg",
        stacked_bars("MoE layer time, summed over layers (" + r.hardware + ")", groups, cats,
                     {"all-to-all (dispatch+combine)", "expert compute (mean GPU)", "GPU idle (max - mean)"},
                     {"#ff7f0e", "#2ca02c", "#7f7f7f"}, time, " s"),
        "MoE layer time per method, decomposed as in the paper: communication, compute, and the idle time the "
        "slowest GPU imposes on the others.");
    return f;
}

// Each row's end-to-end time under the serving workloads (each batch priced on its own), beside the whole trace.
std::string workload_table_html(const CompareResult& r, const Topology& t, const CompareEntry* ref) {
    if (r.workloads.empty()) return "";
    std::string h = "<table>\n<tr><th>row</th><th>whole trace ms</th>";
    for (const BatchSchedule& b : r.workloads) {
        const std::string w = esc(to_string(*b.workload));
        h += "<th>" + w + " prefill ms</th><th>" + w + " decode ms</th><th>" + w + " total ms</th><th>" + w +
             " speedup</th>";
    }
    h += "</tr>\n";
    for (const auto& e : r.entries) {
        if (!(e.topology == t)) continue;
        h += "<tr><td>" + esc(e.row.name) + "</td><td>" + num(e.report.total.end_to_end_s * 1e3, 2) + "</td>";
        for (size_t w = 0; w < e.workloads.size(); ++w) {
            const EvalReport& wr = e.workloads[w];
            double phase[2] = {0, 0};
            for (const PhaseReport& p : wr.phases)
                phase[p.phase == BatchPhase::kPrefill ? 0 : 1] = p.total.end_to_end_s;
            const double sp = ref && w < ref->workloads.size() && wr.total.end_to_end_s > 0
                                  ? ref->workloads[w].total.end_to_end_s / wr.total.end_to_end_s
                                  : 0;
            h += "<td>" + num(phase[0] * 1e3, 2) + "</td><td>" + num(phase[1] * 1e3, 2) + "</td><td>" +
                 num(wr.total.end_to_end_s * 1e3, 2) + "</td><td>" + (sp > 0 ? num(sp, 2) + "x" : "") + "</td>";
        }
        h += "</tr>\n";
    }
    return h + "</table>\n";
}

std::string section_html(const ReportSection& sec, const Figures& figs) {
    const CompareResult& r = *sec.result;
    std::string h = "<h2>" + esc(sec.title) + "</h2>\n<p>" + esc(sec.description) + "</p>\n";
    h += "<p class=\"meta\">model <b>" + esc(r.model) + "</b>, planned on <b>" + esc(r.profile_dataset) +
         "</b>, evaluated on <b>" + esc(r.dataset) + "</b> (" + std::to_string(r.num_tokens) +
         " tokens), hardware <b>" + esc(r.hardware) + "</b>; relative changes against <b>" + esc(r.reference) +
         "</b>.</p>\n";
    for (const Topology& t : topologies_of(r)) {
        const CompareEntry* ref = r.find(r.reference, t);
        h += "<h3>" + esc(t.to_string()) + " (" + std::to_string(t.nodes) + " nodes x " +
             std::to_string(t.gpus_per_node) +
             " GPUs)</h3>\n<table>\n<tr><th>row</th><th>method</th><th>comm</th><th>cross-node copies</th>"
             "<th>intra-node copies</th><th>all-to-all ms</th><th>GPU idle ms</th><th>load std</th>"
             "<th>MoE layer ms</th><th>end-to-end ms</th><th>speedup</th></tr>\n";
        for (const auto& e : r.entries) {
            if (!(e.topology == t)) continue;
            const EvalMetrics& m = e.report.total;
            auto cell = [&](double v, double refv, int prec) {
                std::string s = "<td>" + num(v, prec);
                if (ref && &e != ref && refv != 0) s += " <span class=\"d\">" + pct((v - refv) / refv) + "</span>";
                return s + "</td>";
            };
            const EvalMetrics* rm = ref ? &ref->report.total : nullptr;
            h +=
                std::string("<tr") + (e.row.name == "+DR+TAR" ? " class=\"grace\"" : "") + "><td>" + esc(e.row.name) +
                "</td><td><code>" + esc(e.row.method) + "</code></td><td>" + esc(to_string(e.row.scheme)) + "</td>" +
                cell(static_cast<double>(m.cross_node_copies), rm ? static_cast<double>(rm->cross_node_copies) : 0, 0) +
                cell(static_cast<double>(m.intra_node_copies), rm ? static_cast<double>(rm->intra_node_copies) : 0, 0) +
                cell(m.all_to_all_time_s * 1e3, rm ? rm->all_to_all_time_s * 1e3 : 0, 2) +
                cell(m.gpu_idle_time_s * 1e3, rm ? rm->gpu_idle_time_s * 1e3 : 0, 3) +
                cell(m.load_std, rm ? rm->load_std : 0, 1) +
                cell(m.moe_layer_time_s * 1e3, rm ? rm->moe_layer_time_s * 1e3 : 0, 2) +
                cell(m.end_to_end_s * 1e3, rm ? rm->end_to_end_s * 1e3 : 0, 2) + "<td>" +
                (rm && m.end_to_end_s > 0 ? num(rm->end_to_end_s / m.end_to_end_s, 2) + "x" : "") + "</td></tr>\n";
        }
        h += "</table>\n";
        h += workload_table_html(r, t, ref);
    }
    for (const auto& n : r.notes) h += "<p class=\"note\">note: " + esc(n) + "</p>\n";
    for (const auto& [file, caption] : figs.files)
        h += "<figure><img src=\"" + esc(file) + "\" alt=\"" + esc(file) + "\"><figcaption>" + esc(caption) +
             "</figcaption></figure>\n";
    return h;
}

}  // namespace

std::vector<std::string> write_report(const std::vector<ReportSection>& sections, const std::string& dir,
                                      const std::string& title) {
    GRACE_CHECK(std::filesystem::is_directory(dir), ErrorCode::kIo, "output folder does not exist: ", dir);
    std::vector<std::string> written;
    std::string body;
    // Every file of the report is staged first and committed together, report.html (naming the others) last.
    OutputSet out;
    for (size_t i = 0; i < sections.size(); ++i) {
        const ReportSection& sec = sections[i];
        GRACE_CHECK_ARG(sec.result != nullptr, "report section ", i, " has no result");
        const std::string stem = i == 0 ? "compare" : "compare" + std::to_string(i);
        const auto path = [&](const std::string& name) { return (std::filesystem::path(dir) / name).string(); };
        out.add_text(path(stem + ".json"), compare_to_json(*sec.result));
        out.add_text(path(stem + ".csv"), compare_to_csv(*sec.result));
        written.push_back(path(stem + ".json"));
        written.push_back(path(stem + ".csv"));
        Figures figs;
        if (sec.figures) figs = write_figures(*sec.result, dir, "fig" + std::to_string(i) + "_", out);
        for (const auto& f : figs.files) written.push_back(path(f.first));
        body += section_html(sec, figs);
    }
    const std::string html =
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + esc(title) +
        "</title>\n<style>\nbody{font-family:Helvetica,Arial,sans-serif;margin:24px 40px;color:#222;max-width:1150px}\n"
        "h1{font-size:24px;margin-bottom:4px}h2{border-bottom:2px solid #1f77b4;padding-bottom:4px;margin-top:36px}\n"
        "table{border-collapse:collapse;font-size:13px;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:4px 7px;"
        "text-align:right}th{background:#f0f4f8}td:nth-child(-n+3){text-align:left}\n"
        "tr.grace{background:#eef8ee;font-weight:bold}.d{color:#666;font-size:11px}.meta{color:#444}"
        ".note{color:#a60}\nfigure{margin:18px 0;display:inline-block;vertical-align:top}figure img{max-width:100%;"
        "border:1px solid #ddd}figcaption{font-size:12px;color:#555;max-width:760px}\n</style></head>\n<body>\n<h1>" +
        esc(title) +
        "</h1>\n<p>Every number comes from replaying the trace through each plan (routers are stateful, tokens in "
        "trace order) and pricing the counted token copies with the cost model of spec &sect;7. Times are for one "
        "forward pass of the whole trace as one batch, except in the workload tables, where each batch (a prefill, "
        "or one decode step of every sequence) is priced on its own and the times are summed. Copies and bytes are per "
        "direction (dispatch; the combine "
        "sends the same).</p>\n" +
        body + "</body></html>\n";
    const std::string html_path = (std::filesystem::path(dir) / "report.html").string();
    out.add_text(html_path, html);
    out.commit();
    written.push_back(html_path);
    return written;
}

}  // namespace grace
