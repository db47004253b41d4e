#pragma once
// Counter-based hashing for reproducible randomness: the same (seed, a, b) gives the same value on every
// platform and thread count (std:: distributions differ between standard libraries, so none is used).
#include <cstdint>

namespace grace {

inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/// Hash of three words.
inline uint64_t mix64(uint64_t seed, uint64_t a, uint64_t b) {
    return splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b);
}

/// Uniform double in [0, 1) from 53 random bits.
inline double to_unit(uint64_t x) { return static_cast<double>(x >> 11) * 0x1.0p-53; }

/// A small sequential generator (splitmix64 stream) for algorithms that draw many numbers.
class Rng {
  public:
    explicit Rng(uint64_t seed) : state_(seed) {}
    uint64_t next() { return splitmix64(state_++ * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL); }
    double uniform() { return to_unit(next()); }
    /// Uniform integer in [0, n).
    uint64_t below(uint64_t n) { return static_cast<uint64_t>(uniform() * static_cast<double>(n)); }

  private:
    uint64_t state_;
};

}  // namespace grace
