// Option validators shared by the subcommands (declared in command.hpp): bad values fail at parse time with
// CLI11's one-line `--option: message`, before any file is read or written.
#include <cstdlib>
#include <sstream>

#include "command.hpp"
#include "grace/error.hpp"
#include "grace/hardware.hpp"

namespace grace::cli {

CLI::Validator thread_count() { return integer_in<int>(0, kMaxThreads); }

CLI::Validator adapt_decay_value() {
    return CLI::Validator(
        [](std::string& text) -> std::string {
            char* end = nullptr;
            const double d = std::strtod(text.c_str(), &end);
            if (!text.empty() && end && *end == '\0' && d >= 0 && d < 1) return {};  // NaN fails both
            return "must be a number in [0, 1), got '" + text + "'";
        },
        "[0, 1)");
}

CLI::Validator parsed_by(std::function<void(const std::string&)> parse, std::string description) {
    return CLI::Validator(
        [parse = std::move(parse)](std::string& value) -> std::string {
            try {
                parse(value);
            } catch (const std::exception& e) {
                return e.what();
            }
            return {};
        },
        std::move(description));
}

CLI::Validator hardware_value() {
    return parsed_by([](const std::string& s) { load_hardware(s); }, "PRESET|FILE");
}

CLI::Validator topology_value() {
    return parsed_by([](const std::string& s) { Topology::parse(s); }, "NxM");
}

CLI::Validator topology_list() {
    return parsed_by([](const std::string& s) { parse_topologies(s); }, "NxM[,NxM...]");
}

std::vector<Topology> parse_topologies(const std::string& text) {
    std::vector<Topology> out;
    std::stringstream ss(text);
    std::string part;
    while (std::getline(ss, part, ','))
        if (!part.empty()) out.push_back(Topology::parse(part));
    GRACE_CHECK_ARG(!out.empty(), "a topology list needs at least one NxM, got '", text, "'");
    return out;
}

}  // namespace grace::cli
