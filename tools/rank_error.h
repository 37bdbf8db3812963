// rank_error.h — how a rank of a multi-rank job reports the error that ends it.
#pragma once
#include <unistd.h>

#include <cerrno>
#include <exception>
#include <sstream>
#include <string>

#include "comm/communicator.h"

namespace lancet::cli {

// Writes "lancet <command>: error: rank R of N: <what>" to stderr in one write(2) call, then
// ends the whole job through the communicator (MPI_Abort, ncclCommAbort): the other ranks cannot
// know, and must not wait for it. One write, because std::cerr flushes after every piece and
// mpirun's MPI_ABORT banner, printed as soon as the abort starts, could land between them.
inline void report_and_abort_job(const char* command, Communicator& comm, const std::exception& e) noexcept {
  std::string line;
  try {
    std::ostringstream os;
    os << "lancet " << command << ": error: rank " << comm.rank() << " of " << comm.size() << ": " << e.what() << "\n";
    line = os.str();
  } catch (...) {
    line = std::string("lancet ") + command + ": error (and no memory to describe it)\n";
  }
  for (size_t done = 0; done < line.size();) {
    const ssize_t n = ::write(STDERR_FILENO, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  comm.abort(1);
}

}  // namespace lancet::cli
