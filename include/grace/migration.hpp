#pragma once
/// @file migration.hpp
/// The cost of switching a running deployment from one plan to another (issue #13 item 4): the expert weights
/// each GPU must receive, and the time to move them at the hardware model's link bandwidths.
///
/// A GPU g must receive expert e of layer l when PLAN2 puts an instance of e on g and PLAN1 does not. The copy
/// comes from a GPU holding e in PLAN1: the lowest-index one on g's node (over NVLink, intra-node), else the
/// lowest-index one anywhere (over the NICs, cross-node). Time (bandwidth only, every copy of every layer in one
/// transfer phase, no overlap with serving):
///   max( max over GPUs of max(NVLink bytes in, out) / B_nvl,  max over nodes of max(NIC bytes in, out) / B_net )
/// with B_nvl = intra_node_bandwidth (per GPU per direction) and B_net = cross_node_bandwidth (per node per
/// direction), as the all-to-all pricing uses them (hardware.hpp).

#include <cstdint>
#include <vector>

#include "grace/hardware.hpp"
#include "grace/plan.hpp"

namespace grace {

/// What a switch from PLAN1 to PLAN2 moves.
struct MigrationCost {
    double bytes_per_expert = 0;              ///< weights of one expert (3 * H * I * bytes per element)
    std::vector<int64_t> experts_received;    ///< [G]: (layer, expert) instances each GPU must receive
    std::vector<double> bytes_received;       ///< [G]
    std::vector<double> intra_node_bytes_in;  ///< [G] of bytes_received, over NVLink
    std::vector<double> cross_node_bytes_in;  ///< [G] of bytes_received, over the NIC
    int64_t total_experts = 0;                ///< sum of experts_received
    double total_bytes = 0;                   ///< sum of bytes_received
    double intra_node_time_s = 0;             ///< busiest GPU's NVLink direction / B_nvl
    double cross_node_time_s = 0;             ///< busiest node's NIC direction / B_net
    double time_s = 0;                        ///< max of the two
};

/// Checks that PLAN2 can replace PLAN1: same E, L, k and topology. Throws kInvalidInput naming the field and
/// both values.
void check_switchable(const ExpertPlan& plan1, const ExpertPlan& plan2);

/// The migration cost of switching from plan1 to plan2 (check_switchable first). `bytes_per_expert` > 0; the
/// hardware model must be valid. Throws kInvalidArgument for bytes_per_expert <= 0.
MigrationCost migration_cost(const ExpertPlan& plan1, const ExpertPlan& plan2, double bytes_per_expert,
                             const HardwareModel& hardware);

}  // namespace grace
