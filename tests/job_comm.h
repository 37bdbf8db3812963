// job_comm.h — the communicator of the job a test binary runs in: every rank under mpirun
// (tests registered as *.mpi.npN), rank 0 of 1 when run alone. Created once, on first use.
#pragma once
#include <memory>

#include "comm/communicator.h"

namespace lancet::testing {

inline Communicator& comm() {
  static std::unique_ptr<Communicator> c = make_cpu_communicator("auto");
  return *c;
}

}  // namespace lancet::testing
