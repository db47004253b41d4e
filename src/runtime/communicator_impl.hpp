#pragma once
// Internal: constructors of the built-in backends, used by make_communicator.
#include <memory>
#include <string>

#include "grace/communicator.hpp"

namespace grace::detail {

#ifdef GRACE_USE_MPI
std::unique_ptr<Communicator> make_mpi_communicator(const CommunicatorOptions& options);
int mpi_world_size();
int mpi_world_rank();
/// If MPI is initialized: prints `message`, MPI_Abort(MPI_COMM_WORLD). Otherwise returns.
void mpi_abort_world(int code, const std::string& message);
#endif

/// Checks an alltoallv layout against the group size and returns the total receive bytes.
void check_layout(const AlltoallvLayout& layout, int group_size);

}  // namespace grace::detail
