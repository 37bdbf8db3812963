// ddp.h — data-parallel gradient synchronisation, as torch's DistributedDataParallel does it.
//
// GradSync takes a model whose replicas live in every rank of a communicator and
//   * broadcasts parameters and buffers from rank 0 (start, resume; buffers again before
//     validation and checkpoints, so every rank evaluates and saves rank 0's statistics —
//     what DDP's broadcast_buffers gives);
//   * packs the parameter gradients into buckets of about `bucket_mb` MB, filled in reverse
//     order of registration (= reverse order of use in a feed-forward model, so the first
//     bucket is ready first). Gradients become views into their bucket's flat buffer
//     (DDP's gradient_as_bucket_view): no copies;
//   * during backward, as soon as every gradient of a bucket is final (the module's
//     gradient-ready hook), starts its all-reduce (mean) without waiting — buckets start in
//     bucket order on every rank, so the collectives match — and drives the transfers in
//     flight at every later hook, so communication overlaps the rest of the backward;
//   * finish() starts what is left and waits for everything: afterwards every rank holds the
//     average gradient;
//   * like DDP, records the order in which the gradients became ready during the first
//     backward and, at the start of the second, lays the buckets out again in that order
//     (rank 0's order, broadcast): branches (residual shortcuts, SE) make the real order
//     differ from reverse registration, and a bucket can only start when all of it is ready.
// Gradient accumulation: backward passes with sync off (begin_backward(false)) only
// accumulate locally; the final micro-step's backward (sync on) reduces the sum.
// On a GPU (the NCCL communicator) the buckets live on the device and fill on the compute
// stream (the legacy default stream); each bucket's all-reduce runs on NCCL's own stream once
// the compute stream has passed its last gradient, and finish() makes the compute stream wait
// for them (the optimizer's kernels come after): the host blocks nowhere, so finish()'s
// seconds are only what enqueuing took. The all-reduces are issued from a communication stream
// of GradSync's own, which waits for each one at once (Work::wait orders the issuing stream):
// it follows NCCL's stream step by step, so timing events recorded on it bracket every bucket's
// all-reduce without comm/ exposing NCCL's stream.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "layers/module.h"
#include "trainer/config.h"

namespace lancet {

struct GradSyncOptions {
  double bucket_mb = 25;  // bucket capacity; a larger parameter gets a bucket of its own
  bool overlap = true;    // false: every bucket is reduced in finish(), after the backward
  // false: no gradient-ready hooks; the caller starts the reductions (start_all) once the
  // backward is done. For pipeline stages, whose backward runs on worker threads while only
  // the training thread may call MPI.
  bool hooks = true;
};

class GradSync {
 public:
  // Installs the gradient-ready hook and rebinds the gradients as bucket views: construct it
  // after the model is on its device and before the optimizer step runs. The model's
  // parameters must not be re-created (Module::to) while it exists.
  GradSync(Module& model, Communicator& comm, const GradSyncOptions& options);
  // The parameters of several modules (a pipeline stage: a contiguous run of a model's units),
  // all on one device.
  GradSync(std::vector<Module*> parts, Communicator& comm, const GradSyncOptions& options);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  void broadcast_parameters(const Stream& s);  // parameters and buffers from rank 0
  void broadcast_buffers(const Stream& s);

  // Before each backward: sync = false on non-final accumulation micro-steps.
  void begin_backward(bool sync);
  // Starts (without waiting) every bucket not yet started in this sync step; finish() waits.
  void start_all(const Stream& s);
  // Tests the reductions in flight (Open MPI progresses nonblocking collectives only inside MPI
  // calls), recording when each completed. For a caller waiting on something else.
  void progress();
  // After the backward of a sync step: reduces what the hooks did not start, waits for all.
  // Returns the seconds spent waiting here (the part of communication not hidden). On a GPU the
  // wait is the compute stream's (NCCL events, no host block), so this is the host's time to
  // queue it; the device-side wait is the step profiler's grad_sync phase (CUDA events).
  double finish(const Stream& s);

  int num_buckets() const { return static_cast<int>(buckets_.size()); }
  std::vector<int64_t> bucket_elements() const;  // per bucket, in reduction order
  int64_t buckets_started_in_backward() const { return started_in_backward_; }  // last sync step

  // When each bucket's work happened in the last backward, in seconds since begin_backward:
  // ready = its last gradient became final (recorded with one rank too, so a single-process
  // run measures what a scaling prediction needs); start = its all-reduce was started, done =
  // the all-reduce was complete (-1 when there was none: one rank or sync off).
  // The clock depends on the device. CPU: the host's (steady_clock), when the hook ran, the
  // all-reduce was started, and its completion was seen (at a hook, progress() or finish()).
  // GPU: the device's, from CUDA events with timing: the origin is recorded on the compute
  // stream at begin_backward, ready on the compute stream at the bucket's last gradient (the
  // device has passed that gradient's kernels), start and done on the communication stream
  // around the all-reduce (start: the compute stream has passed the bucket and the previous
  // all-reduce is done, so NCCL can begin it). That is when the device ran the work, not when
  // the host queued it, and on the same clock as the step profiler's phase times.
  // On a GPU the events are resolved here, on the first call after they were recorded: it
  // blocks the host until they have completed (each event, not the device), so call it after
  // the step (bench does, after synchronising the stream), not inside it.
  struct BucketTiming {
    int64_t bytes = 0;
    double ready_s = -1, start_s = -1, done_s = -1;
  };
  const std::vector<BucketTiming>& timings();
  bool device_timed() const { return clock_ != nullptr; }  // true on a GPU: see timings()
  // Changes when the buckets are laid out anew (once, at the second backward: see below).
  int64_t layout_version() const { return layout_version_; }

 private:
  struct DeviceClock;  // the CUDA events and communication stream of a GPU's timings (ddp.cpp)
  struct Bucket {
    Tensor flat;
    std::vector<Parameter*> params;
    int pending = 0;  // gradients not yet ready in this backward
    std::unique_ptr<Work> work;
  };
  void on_ready(Parameter& p);
  void start(size_t b, const Stream& s);
  void layout(const std::vector<Parameter*>& order);  // buckets from consecutive runs of `order`
  void rebuild();

  std::vector<std::pair<std::string, Parameter*>> named_parameters() const;
  std::vector<std::pair<std::string, Tensor*>> state_dict() const;
  std::vector<std::pair<std::string, Tensor*>> named_buffers() const;

  std::vector<Module*> parts_;
  Device device_;
  Communicator& comm_;
  GradSyncOptions options_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<Parameter*, size_t>> bucket_of_;  // sorted by parameter address
  size_t next_to_start_ = 0;
  bool sync_ = false;
  int64_t started_in_backward_ = 0;
  Stream stream_;
  std::vector<BucketTiming> timings_;
  std::vector<Parameter*> ready_order_;  // during the first backward
  bool rebuilt_ = false;
  int64_t layout_version_ = 0;
  std::chrono::steady_clock::time_point t0_;
  double since_t0() const;
  std::unique_ptr<DeviceClock> clock_;  // GPU only; null on the CPU (host clock)
};

// Checks that every rank runs the same job: `fields` (name -> value, e.g. "train.batch_size"
// -> 64) are compared with rank 0's. On a difference every rank throws the same one-line error
// naming the field, rank 0's value and the first differing rank's value.
void check_same_on_all_ranks(Communicator& comm, const std::vector<std::pair<std::string, std::string>>& fields);

// The settings a rank may set for itself (a rank's cores, loader threads, its own outputs; the
// reasons are in ddp.cpp): every other setting must be the same on all ranks.
const std::vector<std::string>& per_rank_settings();
// The resolved configuration as check_same_on_all_ranks's fields: one per setting, named by its
// path ("train.clip_grad_norm" -> "0.01"), sections in key order, without per_rank_settings().
// Numbers are written so that 1 and 1.0 compare equal; strings and lists as JSON.
std::vector<std::pair<std::string, std::string>> config_fields(const Json& config);

// After training, DDP's invariant: every rank's parameters are bit-identical to rank 0's (the
// same start, the same averaged gradients, the same optimizer arithmetic). Hashes the bytes of
// each parameter (FNV-1a 64 on the host; a GPU tensor is copied there, after the work queued
// on it) and compares the hashes with rank 0's. Returns a line for the log; when a rank
// differs, every rank throws the same error naming the first such rank and parameter.
// Buffers are not compared: per-rank BatchNorm statistics differ by design (rank 0's are
// broadcast before they are used or saved). Collective; cheap next to one training step.
std::string check_parameters_identical(Communicator& comm, const std::vector<std::pair<std::string, Parameter*>>& params);

// train.threads resolved for this rank: the configured count when > 0, else 1 when several
// ranks share the node (each takes its own cores), else every hardware thread.
int threads_per_rank(int configured, const Communicator& comm);

// Pins this rank's threads (dist.bind): "auto" pins only when several ranks share the node
// and the launcher left each one the whole machine; "cores" always; "none" never. A rank
// takes `threads` consecutive cores of the CPUs it may run on, offset by its local rank
// (wrapping when the node has fewer). Returns a description for the log, with a warning when
// the launcher bound the rank to fewer cores than it has threads.
std::string bind_rank_threads(const std::string& mode, const Communicator& comm, int threads);

// Failure injection for testing the failure handling: LANCET_FAULT="RANK:STEP:WHAT" makes rank
// RANK, right after optimizer step STEP (1-based), die (WHAT = kill: SIGKILL, as an OOM kill or
// a lost node would), hang (sleep forever), throw (error) or silently drift from the other
// ranks (perturb: adds 1e-3 to the first element of `model`'s first parameter, as a rank whose
// arithmetic or settings differ would; check_parameters_identical must catch it). Unset:
// nothing happens.
class FaultInjection {
 public:
  enum class What { none, kill, hang, error, perturb };
  FaultInjection() = default;
  FaultInjection(What what, int64_t step) : what_(what), step_(step) {}
  void maybe_fail(int64_t step, Module& model) const;

 private:
  What what_ = What::none;
  int64_t step_ = 0;
};
// Reads LANCET_FAULT for this rank; throws on a malformed value.
FaultInjection fault_injection_from_env(int rank);

}  // namespace lancet
