// Choosing the communicator from the launcher's environment and the training device.
#include "comm/communicator.h"

#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace lancet {

#ifdef LANCET_WITH_MPI
std::unique_ptr<Communicator> make_mpi_communicator();  // comm/mpi/mpi_communicator.cpp
#else
bool mpi_available() { return false; }
#endif

#ifdef LANCET_WITH_NCCL
// comm/nccl/nccl_communicator.cpp: NCCL on `device`, bootstrapped over (and keeping) `host`.
std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host, Device device);
#else
bool nccl_available() { return false; }
std::string nccl_version() { return "off"; }
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

bool rank_picks_gpu(const std::string& device) { return device == "cuda" || device == "gpu"; }

int choose_cuda_device(const std::string& device, int local_rank, int local_size, int device_count,
                       int gpus_per_rank) {
  const Device d = parse_device(device);
  LANCET_CHECK(d.is_cuda(), "choose_cuda_device: '" << device << "' is not a CUDA device");
  LANCET_CHECK(local_size >= 1 && local_rank >= 0 && local_rank < local_size,
               "choose_cuda_device: local rank " << local_rank << " of " << local_size);
  LANCET_CHECK(gpus_per_rank >= 1, "choose_cuda_device: " << gpus_per_rank << " GPUs per rank");
  LANCET_CHECK(device_count > 0, "train.device " << device << ": no CUDA device is visible to this process");
  const int k = gpus_per_rank;
  const std::string each = k == 1 ? "one GPU per rank" : std::to_string(k) + " GPUs per rank";
  // Every rank sees the node's GPUs (more than its own share); otherwise the launcher gave each
  // rank its own (srun --gpus-per-task).
  const bool shared_view = local_size > 1 && device_count > k;
  if (rank_picks_gpu(device)) {  // parse_device's spellings without an index
    LANCET_CHECK(device_count >= k, "train.device " << device << " with pipeline stages on " << k << " GPUs per rank, but "
                                                    << device_count << " GPU(s) are visible to this process");
    LANCET_CHECK(!shared_view || local_size * k <= device_count,
                 "train.device " << device << " with " << local_size << " ranks on this node"
                                 << (k == 1 ? "" : " (" + each + ")") << " but only "
                                 << device_count << " GPUs: NCCL cannot run two ranks on one GPU; start at most "
                                 << device_count / k << " ranks per node");
    return shared_view || k == 1 ? (local_rank * k) % device_count : 0;
  }
  LANCET_CHECK(d.index < device_count,
               "train.device " << device << ": " << device_count << " CUDA device(s) visible to this process");
  LANCET_CHECK(!(local_size > 1 && device_count > 1),
               "train.device " << device << " with " << local_size << " ranks on this node puts all of them on GPU "
                               << d.index << " (NCCL needs " << each << "); use train.device cuda: rank i of a node takes cuda:"
                               << (k == 1 ? "(i mod " + std::to_string(device_count) + ")" : "(i*" + std::to_string(k) + ")")
                               << (k == 1 ? "" : " onwards"));
  return d.index;
}

namespace {
int visible_cuda_devices() {
#ifdef LANCET_WITH_CUDA
  return static_cast<int>(cuda_devices().size());
#else
  return 0;
#endif
}
}  // namespace

Device rank_device(const std::string& device, const Communicator& comm, int gpus_per_rank) {
  const Device d = parse_device(device);
  if (d.is_cpu()) return d;
  const int n = visible_cuda_devices();
  if (n == 0) return d;
  return Device::cuda(choose_cuda_device(device, comm.local_rank(), comm.local_size(), n, gpus_per_rank));
}

std::unique_ptr<Communicator> make_communicator(const std::string& backend, const std::string& device,
                                                double timeout_s, int gpus_per_rank) {
  LANCET_CHECK(backend == "auto" || backend == "mpi" || backend == "single" || backend == "nccl",
               "communicator backend '" << backend << "': expected auto, mpi, single or nccl");
  const bool cuda = parse_device(device).is_cuda();
  LANCET_CHECK(cuda || backend != "nccl",
               "dist.backend nccl needs train.device cuda (NCCL reduces GPU tensors), got train.device " << device);
  if (!cuda) {
    std::unique_ptr<Communicator> c = make_cpu_communicator(backend);
    if (timeout_s > 0) c->set_timeout(timeout_s);
    return c;
  }
  LANCET_CHECK(backend != "nccl" || nccl_available(),
               "dist.backend nccl: this build of lancet has no NCCL (found at build time with the CUDA toolkit, in "
               "NCCL_ROOT or on CMAKE_PREFIX_PATH)");
  std::unique_ptr<Communicator> host = make_cpu_communicator(backend == "nccl" ? "auto" : backend);
  if (timeout_s > 0) host->set_timeout(timeout_s);  // the NCCL communicator below takes it over
  if (backend == "mpi" || !nccl_available()) {
    LANCET_CHECK(host->size() == 1, "train.device " << device << " with " << host->size() << " ranks needs NCCL: "
                                                    << (nccl_available() ? "set dist.backend auto or nccl"
                                                                         : "this build of lancet has no NCCL")
                                                    << " (the MPI backend reduces CPU tensors only)");
    return host;
  }
  // One process with backend auto: nothing to reduce, so no NCCL (its bootstrap and proxy
  // thread would be pure overhead); backend nccl gives a 1-rank NCCL communicator.
  if (backend == "single" || (backend == "auto" && host->size() == 1)) return host;
  const int n = visible_cuda_devices();
  if (n == 0) {
    // No GPU: the trainer's device check says so, naming train.device; an explicit nccl cannot wait for that.
    LANCET_CHECK(backend != "nccl", "dist.backend nccl: no CUDA device is visible to this process");
    return host;
  }
#ifdef LANCET_WITH_NCCL
  const int index = choose_cuda_device(device, host->local_rank(), host->local_size(), n, gpus_per_rank);
  return make_nccl_communicator(std::move(host), Device::cuda(index));
#else
  return host;  // unreachable: nccl_available() is false
#endif
}

}  // namespace lancet
