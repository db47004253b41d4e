#include "grace/topology.hpp"

#include <cctype>

#include "grace/error.hpp"

namespace grace {

std::string Topology::to_string() const {
    std::string s = std::to_string(nodes) + "x" + std::to_string(gpus_per_node);
    if (slots_per_gpu) {
        s += ':';  // two appends: `":" + std::string&&` trips GCC 12's bogus -Wrestrict (GCC bug 105651)
        s += std::to_string(*slots_per_gpu);
    }
    return s;
}

void Topology::validate() const {
    GRACE_CHECK_ARG(nodes >= 1 && gpus_per_node >= 1, "topology ", nodes, "x", gpus_per_node,
                    " is impossible: nodes and GPUs per node must both be at least 1");
    GRACE_CHECK_ARG(!slots_per_gpu || *slots_per_gpu >= 1, "slots per GPU must be at least 1, got ", *slots_per_gpu);
}

Topology Topology::parse(const std::string& text) {
    auto x = text.find_first_of("xX");
    auto is_number = [](const std::string& s) {
        if (s.empty() || s.size() > 6) return false;
        for (char c : s)
            if (!std::isdigit(static_cast<unsigned char>(c))) return false;
        return true;
    };
    GRACE_CHECK_ARG(x != std::string::npos, "topology '", text, "' is not of the form NxM (e.g. 2x4)");
    std::string n = text.substr(0, x), m = text.substr(x + 1);
    GRACE_CHECK_ARG(is_number(n) && is_number(m), "topology '", text, "' is not of the form NxM (e.g. 2x4)");
    Topology t;
    t.nodes = std::stoi(n);
    t.gpus_per_node = std::stoi(m);
    GRACE_CHECK_ARG(t.nodes >= 1 && t.gpus_per_node >= 1, "topology '", text,
                    "' has a zero: nodes and GPUs per node must both be at least 1");
    return t;
}

}  // namespace grace
