// Point-to-point bandwidth and latency between MPI ranks, to measure the links a run really has (for example the
// tc-limited veth of bench/netns/run_slow_link.sh). Run: mpirun -n 4 build/bench/mpi/bench_pingpong [ranks_per_node]
//   For each pair class (intra: rank 0 <-> 1; cross: rank 0 <-> ranks_per_node; cross x M: every rank r < M with
//   r + M at once, so the cross-node link is shared as in an all-to-all) and each message size, a ping-pong of
//   `iters` round trips after 2 warm-up ones. latency = half the median round trip; bandwidth = size / (half the
//   median round trip), per pair, and summed over the concurrent pairs for "cross x M" (one direction at a time:
//   a ping-pong never sends both ways at once).
#define OMPI_SKIP_MPICXX 1  // the C API only (MPI::MPI_C), not the deprecated C++ bindings
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// Median half round trip of `iters` ping-pongs of `bytes` between this rank and `peer` (the lower rank starts).
double half_rtt(int me, int peer, std::vector<char>& buf, int bytes, int iters) {
    std::vector<double> t;
    for (int i = 0; i < iters + 2; ++i) {
        const double t0 = MPI_Wtime();
        if (me < peer) {
            MPI_Send(buf.data(), bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD);
            MPI_Recv(buf.data(), bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(buf.data(), bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf.data(), bytes, MPI_CHAR, peer, 0, MPI_COMM_WORLD);
        }
        if (i >= 2) t.push_back((MPI_Wtime() - t0) / 2);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    int me = 0, n = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    const int M = argc > 1 ? std::atoi(argv[1]) : n / 2;
    if (M < 1 || 2 * M > n) {
        if (me == 0) std::fprintf(stderr, "bench_pingpong: need ranks_per_node M with 2*M <= %d ranks\n", n);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    char host[MPI_MAX_PROCESSOR_NAME];
    int len = 0;
    MPI_Get_processor_name(host, &len);
    std::vector<char> hosts(static_cast<size_t>(n) * MPI_MAX_PROCESSOR_NAME);
    MPI_Gather(host, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, hosts.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0,
               MPI_COMM_WORLD);
    if (me == 0) {
        std::printf("# %d ranks, %d per node; hosts:", n, M);
        for (int r = 0; r < n; ++r) std::printf(" %d=%s", r, &hosts[static_cast<size_t>(r) * MPI_MAX_PROCESSOR_NAME]);
        std::printf(
            "\n| pairs | size (B) | latency (us) | bandwidth per pair (MB/s) | total (MB/s) | total (Gbit/s) |\n"
            "|---|---|---|---|---|---|\n");
    }
    const int sizes[] = {8, 65536, 1 << 20, 8 << 20};
    std::vector<char> buf(8 << 20, 1);
    struct Case {
        const char* name;
        int pairs;
    };
    const Case cases[] = {{"intra (0-1)", 1}, {"cross (0-M)", 1}, {"cross x M", M}};
    for (int c = 0; c < 3; ++c) {
        if (c == 0 && M < 2) continue;
        for (int bytes : sizes) {
            const int iters = bytes >= (1 << 20) ? 10 : 50;
            int peer = -1;
            if (c == 0 && me < 2) peer = 1 - me;
            if (c == 1 && (me == 0 || me == M)) peer = me == 0 ? M : 0;
            if (c == 2 && me < 2 * M) peer = me < M ? me + M : me - M;
            MPI_Barrier(MPI_COMM_WORLD);
            double h = peer >= 0 ? half_rtt(me, peer, buf, bytes, iters) : 0.0;
            double worst = 0;
            MPI_Reduce(&h, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
            if (me == 0) {
                const double per = bytes / worst / 1e6, total = per * cases[c].pairs;
                std::printf("| %s | %d | %.1f | %.1f | %.1f | %.3f |\n", cases[c].name, bytes, worst * 1e6, per, total,
                            total * 8 / 1e3);
            }
        }
    }
    MPI_Finalize();
    return 0;
}
