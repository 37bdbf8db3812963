// Choosing the CPU communicator from the launcher's environment.
#include "comm/communicator.h"

namespace lancet {

#ifdef LANCET_WITH_MPI
std::unique_ptr<Communicator> make_mpi_communicator();  // comm/mpi/mpi_communicator.cpp
#else
bool mpi_available() { return false; }
#endif

std::unique_ptr<Communicator> make_cpu_communicator(const std::string& backend) {
  LANCET_CHECK(backend == "auto" || backend == "mpi" || backend == "single",
               "communicator backend '" << backend << "': expected auto, mpi or single");
  const LaunchInfo li = detect_launch();
  if (backend == "single") {
    LANCET_CHECK(li.size == 1, "communicator backend 'single', but " << li.launcher << " started " << li.size
                                                                     << " tasks; use auto or mpi");
    return make_single_process_communicator();
  }
  if (backend == "mpi" || li.size > 1) {
#ifdef LANCET_WITH_MPI
    return make_mpi_communicator();
#else
    LANCET_FAIL(li.launcher << " started " << li.size
                            << " tasks but this build has no MPI (install libopenmpi-dev and rebuild)");
#endif
  }
  return make_single_process_communicator();
}

}  // namespace lancet
