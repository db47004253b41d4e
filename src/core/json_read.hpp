#pragma once
// Reading integers out of JSON files (internal). nlohmann's get<int>() narrows silently (2^32 + 16 becomes 16,
// 16.7 becomes 16), so every grace reader takes its integers through json_int(): the value is read as a 64-bit
// integer, range-checked, and a failure throws kInvalidInput naming the file kind and the field path, e.g.
//   plan: layers[3].routing.weights[5][1]: 4294967312 is outside [1, 65535]
// Works for nlohmann::json and nlohmann::ordered_json alike.

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "grace/error.hpp"

namespace grace::detail {

inline constexpr int kInt32Max = std::numeric_limits<int32_t>::max();

// The checking core. `field` is called only on failure, so callers in loops pay nothing for the path string.
template <typename T, typename Json, typename FieldName>
T json_int_named(const Json& v, const std::string& what, const FieldName& field, T lo, T hi) {
    static_assert(std::is_integral_v<T> && sizeof(T) >= 4 && sizeof(T) <= 8);  // not char: cat() would print a letter
    // __int128 holds every int64 and uint64 value, so lo <= x <= hi compares exactly whatever the JSON held.
    __int128 x = 0;
    if (v.is_number_unsigned()) {
        x = v.template get<uint64_t>();
    } else if (v.is_number_integer()) {
        x = v.template get<int64_t>();
    } else if (v.is_number_float()) {
        const double d = v.template get<double>();
        // A whole float (1e3, 16.0) is taken as the integer it spells; anything else is not an integer.
        GRACE_CHECK_INPUT(std::isfinite(d) && d == std::floor(d), what, ": ", field(), ": ", v.dump(),
                          " is not an integer");
        // Beyond any range below: report it without casting (a cast of a too-large double is undefined).
        GRACE_CHECK_INPUT(std::fabs(d) < 0x1p100, what, ": ", field(), ": ", v.dump(), " is outside [", lo, ", ", hi,
                          "]");
        x = static_cast<__int128>(d);
    } else {
        GRACE_CHECK_INPUT(false, what, ": ", field(), ": ", v.dump(), " is not an integer");
    }
    GRACE_CHECK_INPUT(x >= static_cast<__int128>(lo) && x <= static_cast<__int128>(hi), what, ": ", field(), ": ",
                      v.dump(), " is outside [", lo, ", ", hi, "]");
    return static_cast<T>(x);
}

/// Reads JSON value `v` as an integer in [lo, hi]. `what` names the file ("plan", a path), `field` the value's
/// path inside it ("layers[3].layer"). Throws kInvalidInput for a non-integer (16.7, "16", null) or a value
/// outside [lo, hi].
template <typename T = int, typename Json>
T json_int(const Json& v, const std::string& what, const std::string& field, std::type_identity_t<T> lo,
           std::type_identity_t<T> hi) {
    return json_int_named<T>(
        v, what, [&] { return field; }, lo, hi);
}

/// Member `key` of object `obj` (whose own path is `field`, empty at the top level). Throws kInvalidInput
/// naming the path when `obj` is not an object or lacks the member.
template <typename Json>
const Json& json_member(const Json& obj, const std::string& what, const std::string& field, const std::string& key) {
    const std::string path = field.empty() ? key : field + "." + key;
    GRACE_CHECK_INPUT(obj.is_object(), what, ": ", field.empty() ? std::string("top level") : field,
                      " must be a JSON object");
    auto it = obj.find(key);
    GRACE_CHECK_INPUT(it != obj.end(), what, ": missing field ", path);
    return *it;
}

/// Reads required member `key` of `obj` as an integer in [lo, hi] (see json_int).
template <typename T = int, typename Json>
T json_int_member(const Json& obj, const std::string& what, const std::string& field, const std::string& key,
                  std::type_identity_t<T> lo, std::type_identity_t<T> hi) {
    const std::string path = field.empty() ? key : field + "." + key;
    return json_int<T>(json_member(obj, what, field, key), what, path, lo, hi);
}

/// Reads an array of integers, each in [lo, hi]; errors name the element ("field[5]").
template <typename Json>
std::vector<int> json_int_vector(const Json& v, const std::string& what, const std::string& field, int lo, int hi) {
    GRACE_CHECK_INPUT(v.is_array(), what, ": ", field, " must be an array of integers");
    std::vector<int> out;
    out.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i)
        out.push_back(json_int_named<int>(
            v[i], what, [&] { return cat(field, "[", i, "]"); }, lo, hi));
    return out;
}

/// Reads an array of arrays of integers, each in [lo, hi]; errors name the element ("field[5][1]").
template <typename Json>
std::vector<std::vector<int>> json_int_matrix(const Json& v, const std::string& what, const std::string& field, int lo,
                                              int hi) {
    GRACE_CHECK_INPUT(v.is_array(), what, ": ", field, " must be an array of integer arrays");
    std::vector<std::vector<int>> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
        const Json& row = v[i];
        GRACE_CHECK_INPUT(row.is_array(), what, ": ", field, "[", i, "] must be an array of integers");
        out[i].reserve(row.size());
        for (size_t j = 0; j < row.size(); ++j)
            out[i].push_back(json_int_named<int>(
                row[j], what, [&] { return cat(field, "[", i, "][", j, "]"); }, lo, hi));
    }
    return out;
}

}  // namespace grace::detail
