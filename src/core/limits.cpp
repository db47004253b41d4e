#include "core/limits.hpp"

#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "grace/error.hpp"

namespace grace::detail {

int64_t checked_product(std::initializer_list<int64_t> factors, const std::string& what) {
    int64_t p = 1;
    bool overflow = false;
    for (int64_t f : factors) {
        GRACE_ASSERT(f >= 0);
        if (!overflow && __builtin_mul_overflow(p, f, &p)) overflow = true;
    }
    if (overflow) {
        std::string text;
        for (int64_t f : factors) text += (text.empty() ? "" : " x ") + std::to_string(f);
        GRACE_CHECK_INPUT(false, what, ": ", text, " overflows a 64-bit size");
    }
    return p;
}

double memory_limit(std::string* source) {
    if (const char* env = std::getenv("GRACE_MEMORY_LIMIT"); env && *env) {
        char* end = nullptr;
        const double v = std::strtod(env, &end);
        double scale = 1;
        static const char kSuffixes[] = "KMGT";  // binary: K = 2^10, ..., T = 2^40
        if (const char* u = *end ? std::strchr(kSuffixes, std::toupper(static_cast<unsigned char>(*end))) : nullptr) {
            scale = std::ldexp(1.0, 10 * static_cast<int>(u - kSuffixes + 1));
            ++end;
            if (*end == 'i' || *end == 'I') ++end;  // "16GiB"
        }
        if (*end == 'B' || *end == 'b') ++end;
        GRACE_CHECK_ARG(end != env && *end == '\0' && std::isfinite(v) && v > 0, "GRACE_MEMORY_LIMIT='", env,
                        "' is not a size (e.g. 16G or 17179869184)");
        if (source) *source = "GRACE_MEMORY_LIMIT";
        return v * scale;
    }
    if (source) *source = "the machine's RAM; set GRACE_MEMORY_LIMIT to change it";
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) return std::numeric_limits<double>::infinity();  // unknown: do not refuse
    return static_cast<double>(pages) * static_cast<double>(page);
}

std::string format_bytes(double bytes) {
    static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    int u = 0;
    while (bytes >= 1024 && u + 1 < static_cast<int>(sizeof(kUnits) / sizeof(kUnits[0]))) {
        bytes /= 1024;
        ++u;
    }
    char buf[64];
    if (u == 0)
        std::snprintf(buf, sizeof buf, "%.0f B", bytes);
    else
        std::snprintf(buf, sizeof buf, "%.1f %s", bytes, kUnits[u]);
    return buf;
}

void check_memory(double bytes, const std::string& what) {
    std::string source;
    const double limit = memory_limit(&source);
    GRACE_CHECK_ARG(bytes <= limit, what, " needs ", format_bytes(bytes), " (limit: ", format_bytes(limit), ", ",
                    source, ")");
}

}  // namespace grace::detail
