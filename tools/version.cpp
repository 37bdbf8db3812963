// lancet --version: the version, what this build has, and the devices it sees.
#include <sstream>
#include <thread>

#include "comm/communicator.h"
#include "data/dicom.h"
#include "kernels/blas.h"
#include "kernels/parallel.h"
#include "tools/cli.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif
#ifdef LANCET_WITH_MPI
#include <mpi.h>
#endif

namespace lancet::cli {

std::string version_report() {
  std::ostringstream os;
  os << "lancet " << LANCET_VERSION << "\n";
#ifdef LANCET_WITH_CUDA
  os << "  CUDA     " << cuda_runtime_version() << " (runtime)\n"
     << "  cuDNN    " << cudnn_version_string() << "\n"
     << "  cuBLAS   " << cublas_version_string() << "\n";
#else
  os << "  CUDA     off\n"
     << "  cuDNN    off\n";
#endif
  os << "  NCCL     " << nccl_version() << "\n";
#ifdef LANCET_WITH_MPI
  char lib[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(lib, &len);  // callable before MPI_Init
  std::string mpi(lib, static_cast<size_t>(len));
  mpi = mpi.substr(0, mpi.find(','));
  os << "  MPI      " << mpi << " (MPI " << MPI_VERSION << "." << MPI_SUBVERSION << ")\n";
#else
  os << "  MPI      off\n";
#endif
  os << "  OpenCV   " << LANCET_OPENCV_VERSION << "\n"
     << "  HDF5     " << LANCET_HDF5_VERSION << "\n"
     << "  DICOM    " << dicom_backend() << "\n"
     << "  BLAS     " << blas_info() << "\n"
     << "devices:\n"
     << "  cpu      " << std::thread::hardware_concurrency() << " hardware threads\n";
#ifdef LANCET_WITH_CUDA
  const auto gpus = cuda_devices();
  if (gpus.empty()) os << "  cuda     none visible\n";
  for (const auto& g : gpus)
    os << "  cuda:" << g.index << "   " << g.name << ", " << (g.total_bytes >> 20) << " MiB, sm_" << g.cc_major
       << g.cc_minor << "\n";
#endif
  return os.str();
}

}  // namespace lancet::cli
