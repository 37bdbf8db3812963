// pipeline.h — pipeline model parallelism: a model's chain of units cut into two stages that
// run concurrently on micro-batches (GPipe and 1F1B schedules), as in the glaucoma study's
// two-GPU MedicalCNN.
//
// The model is a chain of units run in order (MedicalCNN::units(): "stem", "stages.0.0", ...,
// "head"). Stage 0 runs units [0, cut), stage 1 runs [cut, n). Each stage has its own worker
// thread that executes the stage's schedule — a list of forwards and backwards of the step's M
// micro-batches — and its own device: on the CPU each stage is a group of threads
// (set_thread_local_threads) and a memory domain (kernels/allocator.h), so it reports its own
// busy time and peak memory, as a stage on its own GPU would. Activations travel stage 0 ->
// stage 1 and their gradients back through mailboxes keyed by micro-batch; a stage waits only
// for the micro-batch it needs next. The receiving stage copies what it receives into its own
// memory (the device-to-device copy of a real two-device pipeline).
//
// Equivalence: both schedules run each stage's backwards in micro-batch order, and a stage's
// forwards in micro-batch order, so BatchNorm's running statistics, dropout counters and the
// order in which gradients accumulate are exactly those of unpipelined training with M-step
// gradient accumulation over the same micro-batches (train_step_micro): with the same thread
// count per kernel the weights after a step are bitwise equal (tests/test_pipeline.cpp).
//
// Failures: an exception in either stage aborts the mailboxes, so the other stage cannot wait
// forever; the step then throws the first stage's error, naming the stage and micro-batch.
//
// GPU stages (the one-GPU mode): both stages on the model's GPU, each worker thread issuing its
// work on a stream of its own (a blocking stream: a legacy-default-stream op a layer may issue,
// such as Tensor::clone, stays ordered with it) and allocating from a memory pool of its own —
// the stage's memory domain, which on a GPU is a caching allocator of its own (kernels/allocator.h),
// because that allocator is not stream-aware: one pool, one stream. Hand-offs are explicit:
// the sender records an event after producing a tensor; the receiver makes its stream wait for
// it (cudaStreamWaitEvent), copies the tensor into its own pool on its own stream and records a
// second event, and hands the source back; the sender releases the source only once that event
// has completed. Each stage's stream first waits for an event recorded on the training thread's
// stream (the legacy default stream of the model's GPU: the step's input batches, the last
// optimizer step) and is synchronised when the stage's work is done, so everything the training
// thread runs after it (gradient all-reduce, loss scaler, clipping, optimizer) sees its results.
// Busy times on a GPU are CUDA-event times of each forward and backward on the stage's stream;
// peak memory is the stage's pool's.
//
// Stages on two devices (pipeline.devices [cuda:0, cuda:1], one process driving both, as the
// glaucoma study did): place_pipeline_stages moves stage 1's units — their parameters,
// gradients, BatchNorm statistics — to the second device before the optimizer is made (so its
// state is made there too). Stage 1's stream, pool and events are on its GPU; the hand-offs above
// become peer copies (cudaMemcpyPeerAsync on the receiver's stream, ordered by the events,
// which work across devices). Such a copy overlaps the sender's compute (the sender goes on as
// soon as it has recorded its event) but not the receiver's: it is queued when the receiver
// needs the micro-batch. A copy stream per stage that pulled parcels as they arrive was not
// built: the receiver's pool is single-stream (above), so a copy into it on another stream
// would first have to wait for the receiver's queued work. What it could hide is small: the
// spec model cut inside stages.2 at 224x224 hands over [B / M, 256, 14, 14]: 6.4 MB for a
// micro-batch of 64 in fp16, about 0.02-0.03 ms over NVLink and 0.3 ms over PCIe 4, which a
// stage's compute on that micro-batch should dwarf (not yet measured on two GPUs: the first
// such run should compare the stage's idle time with it). The step's labels are copied to the
// last stage's device before the stages start. After the step the training thread works per device (trainer.cpp finish_step:
// the loss scaler's check, the global norm — the root of the per-device sums — clipping and
// the optimizer each run on every device's default stream, stream_on), and the model used whole
// (validation, lancet eval / forward on a checkpoint, the cut measurement) runs each unit on its
// device with copies where the chain crosses (layers.h chain_forward). On the CPU, [cpu, cpu:1]
// (cpu:1 a logical host device, kernels/device.h) runs exactly this logic — every kernel checks
// that its tensors and stream share a device — so the tests check the placement and routing of
// the two-device mode, bit for bit against one device, without two GPUs. With several ranks
// each rank owns such a pair of GPUs (train.device cuda: rank i of a node takes cuda:2i and
// cuda:2i+1, pipeline_devices), and stage 1 reduces its gradients over a communicator of its
// own on its device (Communicator::for_device: a second NCCL communicator per rank).
//
// Data parallelism: each rank owns a pipeline; each stage's gradients are bucketed and
// all-reduced (GradSync without hooks) from the training thread as soon as that stage has run
// its last backward — the last stage's reduction overlaps the first stage's last backwards.
//
// The schedules themselves and the choice of the cut: trainer/pipeline_plan.h.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "kernels/allocator.h"
#include "layers/medicalcnn.h"
#include "layers/module.h"
#include "trainer/ddp.h"
#include "trainer/optimizer.h"
#include "trainer/pipeline_plan.h"
#include "trainer/profiler.h"
#include "trainer/trainer.h"

namespace lancet {

struct PipelineOptions {
  PipeSchedule schedule = PipeSchedule::one_f_one_b;
  int cut = 1;                // index of stage 1's first unit
  int threads_per_stage = 1;  // CPU stages: kernel threads of each stage's worker
  // The device of each stage; empty: both on the model's device. Stage 0 is on the model's
  // device; stage 1 on the same device or another of the same type (units placed there by
  // place_pipeline_stages).
  std::vector<Device> devices;
  // Data parallelism over the communicator passed to the pipeline (when it has > 1 rank):
  // bucket size for each stage's gradient all-reduce.
  double bucket_mb = 25;
};

struct PipelineStageStats {
  std::string first_unit, last_unit;
  int units = 0;
  int64_t parameters = 0;
  std::string device;  // "cpu (2 threads)", "cuda:0 (own stream and memory pool)"
  double busy_s = 0;   // mean per step: forwards + backwards, not waiting
  double forward_s = 0, backward_s = 0;
  double idle = 0;               // mean share of the pipelined step the stage waited
  int max_in_flight = 0;         // micro-batches holding activations at once (schedule)
  int64_t peak_bytes = 0;        // most memory the stage allocated during a step (max over steps)
};
struct PipelineStats {
  int64_t steps = 0;
  int stages = 2, micro_batches = 0;
  std::string schedule;
  double step_s = 0;         // mean wall time of the pipelined forward + backward
  double bubble = 0;         // measured: mean over stages of the share of step_s spent idle
  double bubble_theory = 0;  // (p - 1) / (m + p - 1)
  std::vector<PipelineStageStats> stage;
  Json to_json() const;
  // "pipeline 1f1b, 4 micro-batches: 123.4 ms per step, bubble 22.1% measured (20.0% theory)"
  // and one line per stage: units, busy ms, idle %, peak MiB.
  std::string text() const;
};

// Refuses stage devices a pipeline cannot run on, naming them: not two, stage 0 not on the
// model's device, a CPU and a GPU mixed, a GPU this process does not see.
void check_pipeline_devices(const std::vector<Device>& devices, Device model_device);
// pipeline.devices (empty: both stages on the model's device), parsed and checked.
// rank_relative (train.device "cuda": each rank picks its GPUs, comm/communicator.h
// choose_cuda_device): CUDA indices count from the model's device, the rank's first GPU, so
// [cuda:0, cuda:1] is cuda:0 and cuda:1 for one process and cuda:2 and cuda:3 for a node's
// rank 1 that sees the node's GPUs.
std::vector<Device> pipeline_devices(const std::vector<std::string>& names, Device model_device,
                                     bool rank_relative = false);
// The GPUs one rank's pipeline spans: 1 + the highest CUDA index in pipeline.devices (1 for
// CPUs or none given): choose_cuda_device's gpus_per_rank.
int pipeline_gpus_per_rank(const std::vector<std::string>& names);
// The allocators a training step charges, to read and reset their peaks: on the CPU the host
// allocator (every thread, domain and logical device); on GPUs the training thread's pool on
// `device` and on each stage device (weights, optimizer state, gradients) and each pipeline
// stage's own pool (stage s: domain s + 1). stage_devices empty: no pipeline. The sum of their
// peaks bounds what was held at once from above.
std::vector<Allocator*> training_memory_pools(Device device, const std::vector<Device>& stage_devices);
// Moves units [0, cut) to devices[0] and [cut, n) to devices[1] (Module::to). Before the
// optimizer and any GradSync are made: they hold the parameters' device-resident state.
void place_pipeline_stages(const Units& units, int cut, const std::vector<Device>& devices);

class Pipeline {
 public:
  // `units` is the model's chain (MedicalCNN::units()), each on its stage's device; the model
  // is the whole (zero_grad, the optimizer's parameters, checkpoints are unchanged). With a
  // communicator of several ranks, every rank builds the same pipeline.
  Pipeline(Module& model, Units units, const PipelineOptions& options, Communicator& comm);
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // One optimizer step over micro-batches xs / ys (on the device; at least one), as
  // train_step_micro does it: micro-batch i's loss weighs xs[i].dim(0) / total rows, the loss
  // scaler, clipping and the optimizer as StepOptions say (options.grad_sync must be null: the
  // pipeline synchronises its stages itself). The profiler gets the pipelined forward +
  // backward as Phase::pipeline, then grad_sync and optimizer.
  StepStats train_step(Optimizer& opt, const std::vector<Tensor>& xs, const std::vector<Tensor>& ys, const Loss& loss,
                       const StepOptions& options, StepProfiler* prof = nullptr);

  // Data parallelism: rank 0's parameters and buffers to every rank (start), buffers alone
  // (before validation and checkpoints). Nothing with one rank.
  void broadcast_parameters();
  void broadcast_buffers();

  int num_stages() const { return static_cast<int>(stages_.size()); }
  int cut() const { return options_.cut; }
  // Per stage, for the log: "stage 0: stem .. stages.1.0 (5 units, 1234 parameters) on cpu (1 thread)".
  std::string describe() const;
  // Gradient buckets per stage (data parallelism; empty with one rank).
  std::vector<int> buckets_per_stage() const;

  PipelineStats stats() const;  // since the last reset_stats()
  void reset_stats();

 private:
  struct Worker;
  struct Mailbox;
  struct Gpu;  // stage streams and events (CUDA builds)
  struct Stage {
    std::vector<Module*> modules;
    std::vector<std::string> names;
    std::vector<PipeOp> ops;
    Device device;
    Stream stream;  // the stage's own stream on a GPU; the CPU stream otherwise
    int domain = 0;
    std::unique_ptr<GradSync> sync;
    double busy_s = 0, forward_s = 0, backward_s = 0;  // this step
  };
  struct StepContext;
  void run_stage(int stage, StepContext& ctx);
  Stream main_stream() const { return Stream{model_.device(), nullptr}; }  // the training thread's
  std::string stage_device(const Stage& st) const;
  size_t stage_current_bytes(const Stage& st) const;
  size_t stage_peak_bytes(const Stage& st) const;
  void reset_stage_peak(const Stage& st) const;

  Module& model_;
  Units units_;
  PipelineOptions options_;
  Communicator& comm_;
  std::unique_ptr<Communicator> stage1_comm_;  // stage 1's, on its own device (several ranks); outlives stages_
  std::vector<Stage> stages_;
  std::unique_ptr<Gpu> gpu_;  // null for CPU stages
  std::vector<std::unique_ptr<Worker>> workers_;
  std::unique_ptr<Mailbox> activations_, gradients_;  // stage 0 -> 1, stage 1 -> 0

  // Sums over the steps since reset_stats().
  int64_t steps_ = 0;
  int micro_batches_ = 0;
  double step_sum_s_ = 0;
  std::vector<double> busy_sum_s_, forward_sum_s_, backward_sum_s_, idle_sum_;
  std::vector<int64_t> peak_bytes_;
};

}  // namespace lancet
