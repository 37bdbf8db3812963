// communicator.h — the seam through which the trainer talks to other processes.
//
// Collectives operate in place on contiguous tensors of any device the backend supports (MPI:
// CPU tensors of f32, i32, i64, u8; NCCL: CUDA tensors of f32, f16, bf16, i32, i64, u8, and
// CPU tensors through the MPI or single-process communicator it was bootstrapped over). The
// single-process communicator (rank 0 of 1) makes every collective the identity, so the
// trainer is written once: the MPI (CPU) and NCCL (GPU) backends drop in behind this
// interface. Every rank must call the same collectives in the same order with the same
// shapes. Errors throw lancet::Error naming the call and the backend's reason.
//
// Streams: on the CPU a collective has finished when it returns. On a CUDA tensor it is
// enqueued on the stream `s` it is given and the host does not wait: like a kernel, its
// result is there for the work issued after it on `s`.
#pragma once
#include <memory>
#include <string>

#include "kernels/tensor.h"

namespace lancet {

enum class ReduceOp { sum, mean, max, min };

// A collective in flight. wait() blocks until it has completed (and, for a mean, until the
// result is divided); destroying an unfinished Work waits for it. On a CUDA tensor (NCCL) the
// host does not block: wait() makes the stream the collective was started from wait for it,
// and done() says whether it has finished on the device.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
  virtual bool done() = 0;  // CPU: true once wait() would not block; CUDA: finished on the GPU
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Rank among the processes on this node and their number (GPU choice, thread pinning).
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  virtual std::string backend() const = 0;  // "single", "mpi", "nccl"

  virtual void all_reduce(Tensor& t, ReduceOp op, const Stream& s) = 0;
  // Starts an all-reduce of t and returns at once; t must not be touched until wait().
  // NCCL: on its own stream, after the work issued on `s` so far, overlapping what `s` does next.
  virtual std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op, const Stream& s) = 0;
  virtual void broadcast(Tensor& t, int root, const Stream& s) = 0;
  // out = the ranks' `in` tensors concatenated in rank order (out.numel() == size * in.numel()).
  virtual void all_gather(const Tensor& in, Tensor& out, const Stream& s) = 0;
  // Reduces `in` (size * out.numel() elements) over ranks; rank r gets block r in `out`.
  virtual void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, const Stream& s) = 0;
  // NCCL: a CUDA tensor goes on the device's legacy default stream (the trainer's compute
  // stream), and messages between two ranks match in the order sent (the tag is not used).
  virtual void send(const Tensor& t, int dst, int tag) = 0;
  virtual void recv(Tensor& t, int src, int tag) = 0;
  virtual void barrier() = 0;
  // Reduces n host doubles in place (metrics, losses, SyncBatchNorm statistics); every rank
  // gets the result.
  virtual void all_reduce_doubles(double* v, int n, ReduceOp op) = 0;
  double all_reduce_scalar(double v, ReduceOp op) {
    all_reduce_doubles(&v, 1, op);
    return v;
  }

  // A rank that waits longer than this for the others (one died, hung, or took another code
  // path) gets an error naming the call instead of hanging forever. Default 300 s; <= 0 = never.
  void set_timeout(double seconds) { timeout_s_ = seconds; }
  double timeout() const { return timeout_s_; }
  // Ends every process of the job at once (MPI_Abort): what a rank does after an error that
  // the others cannot know about, so they do not wait for it until their timeout. Returns
  // (does nothing) in a 1-process job.
  virtual void abort(int code) noexcept = 0;

  // A second communicator over the same ranks (same numbering, same timeout) for tensors on
  // `d`, with its own message space: what a pipeline's second stage on another device of each
  // rank reduces its gradients with. Collective: every rank calls it, each with its own d.
  // single: another single-process one; MPI: a duplicate of its MPI communicator (any CPU
  // device); NCCL: a new NCCL communicator on the CUDA device d (bootstrapped over a duplicate
  // of its host communicator; NCCL compares the ranks' GPUs again), or the host's duplicate for
  // a CPU device.
  virtual std::unique_ptr<Communicator> for_device(Device d) = 0;

  bool is_root() const { return rank() == 0; }

 protected:
  double timeout_s_ = 300;
};

// One process: rank 0 of 1.
std::unique_ptr<Communicator> make_single_process_communicator();

// The launcher's view of this process, from the environment: Open MPI's mpirun
// (OMPI_COMM_WORLD_*), Slurm's srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), or PMI/PMIx.
// size 1 with no launcher.
struct LaunchInfo {
  int rank = 0, size = 1, local_rank = 0, local_size = 1;
  std::string launcher = "none";  // "mpirun", "srun", "pmi", "none"
};
LaunchInfo detect_launch();

// The communicator for CPU training: MPI when the process was started by a launcher with more
// than one task (or `backend` is "mpi"), else the single-process one. backend: "auto", "mpi",
// "single". Throws when MPI is asked for (or the launcher says size > 1) and the build has no MPI.
std::unique_ptr<Communicator> make_cpu_communicator(const std::string& backend = "auto");

// True when this build has the MPI backend.
bool mpi_available();

// The communicator for training on `device` ("cpu", "cuda", "cuda:N"). On a CUDA device with
// NCCL built: NCCL on this rank's GPU (choose_cuda_device), bootstrapped over MPI, when a
// launcher started several tasks and backend is "auto" or "nccl"; with "nccl", a plain single
// process gets a 1-rank NCCL communicator (with "auto" it gets the single-process one: there
// is nothing to reduce). Otherwise make_cpu_communicator(backend). backend: "auto", "mpi",
// "single", "nccl". Throws naming the setting for combinations that cannot work (nccl on a
// CPU or without NCCL, several ranks on GPUs without NCCL or with backend mpi).
// timeout_s > 0 (dist.timeout_s) is set before anything collective after the launch, so it
// bounds the NCCL bootstrap too; <= 0 keeps the communicator's default. gpus_per_rank: as
// choose_cuda_device's (a pipeline with a GPU per stage), so that NCCL runs on the rank's first.
std::unique_ptr<Communicator> make_communicator(const std::string& backend, const std::string& device,
                                                double timeout_s = 0, int gpus_per_rank = 1);

// True when this build has the NCCL backend (CUDA tensors across ranks).
bool nccl_available();
// The NCCL library loaded ("2.28.3"), or "off" when this build has no NCCL backend.
std::string nccl_version();

// The GPU index a rank trains on, from train.device: "cuda" (no index) gives each rank on a
// node its own GPU, cuda:(local_rank % device_count); an explicit "cuda:N" is taken as it is.
// NCCL cannot run two ranks on one GPU, so it refuses, with a message, what would put several
// ranks of a node on the same device: more ranks than GPUs, or one explicit cuda:N for every
// rank, when the node's ranks all see the same device_count > 1 GPUs. (With one visible GPU
// per rank, as srun --gpus-per-task=1 arranges, several ranks per node are fine; the NCCL
// communicator still compares the GPUs' UUIDs across ranks at start.) Pure: no CUDA calls.
//
// gpus_per_rank > 1 (a pipeline's stages on GPUs of their own): with "cuda" rank i of a node
// owns GPUs [i*k, i*k + k) when it sees the node's GPUs, or all k it sees when the launcher gave
// it exactly k (srun --gpus-per-task=k); the first of them is returned.
int choose_cuda_device(const std::string& device, int local_rank, int local_size, int device_count,
                       int gpus_per_rank = 1);

// True for train.device "cuda" (or "gpu"), with no index: each rank takes its own GPU(s).
bool rank_picks_gpu(const std::string& device);

// The device this rank trains on: CPU, or the CUDA device choose_cuda_device picks with the
// communicator's local rank and the visible GPUs. Where no GPU is visible (or the build has no
// CUDA) the device as written, so that the trainer's check names the problem.
Device rank_device(const std::string& device, const Communicator& comm, int gpus_per_rank = 1);

}  // namespace lancet
