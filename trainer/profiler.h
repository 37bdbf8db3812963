// profiler.h — where a training step's time goes, phase by phase.
//
// A StepProfiler collects, for every step of an epoch, the time spent in each phase
// (data_wait, h2d, forward, backward, pipeline, grad_sync, optimizer) and in the whole step, and
// reports per-epoch statistics (mean, p50, p95, total) as a text table and as JSON.
// A phase entered several times in one step (gradient accumulation) is summed for that
// step; a phase never entered counts 0. "other" is the step time not covered by a phase.
// Each phase scope also emits a TraceScope (category "phase"), and each step a "step"
// event, when kernels/trace is on. Used by one thread (the training loop); not thread-safe.
//
// On a GPU (set_stream with a CUDA stream) the host only queues work, so host clocks would time
// the queueing. There each phase except data_wait is timed by a pair of CUDA events recorded on
// the stream, i.e. from when the GPU reaches the phase's first op to when it finishes its last
// (GPU idle time inside the phase, e.g. while the host is slow to queue, counts to the phase);
// end_step() waits for the stream, so the step time is the time the GPU work really took.
// data_wait (the host waiting for the loader) keeps the host clock. A step whose GPU work also
// runs on other devices (a pipeline's second GPU) names their streams too: each phase's end
// then waits, on the GPU, for the work queued on them so far (an event join), so the phase
// covers both devices' work, and end_step() waits for all of them.
//
//   StepProfiler prof;                          // per epoch: prof.reset() first
//   prof.begin_step();
//   { auto p = prof.phase(Phase::data_wait); batch = loader.next(); }
//   { auto p = prof.phase(Phase::forward); ... }
//   prof.end_step();
//   log << prof.table();  metrics["phases"] = prof.to_json();
#pragma once
#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "kernels/trace.h"
#include "trainer/config.h"

namespace lancet {

// pipeline: forward and backward of a pipelined step (trainer/pipeline.h), whose stages overlap
// them; its stage-by-stage busy and idle times are in the pipeline's own report.
enum class Phase { data_wait, h2d, forward, backward, pipeline, grad_sync, optimizer };
constexpr int kNumPhases = 7;
const char* phase_name(Phase p);

struct PhaseStats {
  double mean_s = 0, p50_s = 0, p95_s = 0, total_s = 0;
};
// Statistics of `samples` (seconds); percentiles interpolate linearly between order statistics
// (numpy's default). All zero for no samples.
PhaseStats compute_stats(std::vector<double> samples);

class StepProfiler {
 public:
  using Clock = std::chrono::steady_clock;

  class Scope {
   public:
    ~Scope() {
      prof_.add(phase_, std::chrono::duration<double>(Clock::now() - start_).count());
      if (gpu_slot_ >= 0) prof_.gpu_mark_end(gpu_slot_);
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    friend class StepProfiler;
    Scope(StepProfiler& prof, Phase phase)
        : prof_(prof), phase_(phase), trace_(phase_name(phase), "phase"), start_(Clock::now()),
          gpu_slot_(prof.gpu_mark_begin(phase)) {}
    StepProfiler& prof_;
    Phase phase_;
    TraceScope trace_;
    Clock::time_point start_;
    int gpu_slot_;  // -1: host-timed
  };

  StepProfiler();
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  // The stream the timed GPU work runs on (a CUDA stream switches to event timing, see above);
  // a CPU stream (the default) times with host clocks. `also`: streams on other CUDA devices
  // that a step's phases use as well (joined at each phase's end). Call between steps.
  void set_stream(const Stream& s, const std::vector<Stream>& also = {});

  // Times `phase` until the returned scope ends: `auto p = prof.phase(Phase::forward);`.
  Scope phase(Phase p) { return Scope(*this, p); }
  // Adds measured or injected time to a phase of the current step.
  void add(Phase p, double seconds) { current_[static_cast<int>(p)] += seconds; }

  void begin_step();
  // Closes the step: its time is the wall time since begin_step(), or `step_seconds` when
  // given (tests, or a caller with its own clock).
  void end_step();
  void end_step(double step_seconds);

  int64_t steps() const { return static_cast<int64_t>(step_s_.size()); }
  PhaseStats stats(Phase p) const { return compute_stats(phase_s_[static_cast<int>(p)]); }
  PhaseStats step_stats() const { return compute_stats(step_s_); }
  PhaseStats other_stats() const;

  // Milliseconds per step; share = the phase's total over the steps' total.
  //   phase        mean ms    p50 ms    p95 ms   share
  //   data_wait      1.234     1.200     2.000    3.1%
  std::string table() const;
  // {"steps":N,"step":{"mean_ms":..,"p50_ms":..,"p95_ms":..,"total_s":..},
  //  "phases":{"data_wait":{...,"share":..},...,"other":{...}}}
  Json to_json() const;
  // Drops every recorded step (call at the start of each epoch).
  void reset();

 private:
  int gpu_mark_begin(Phase p);  // -1 unless event-timed
  void gpu_mark_end(int slot);
  void gpu_resolve_step();      // waits for the stream; event times replace host times

  struct GpuMarks;              // CUDA events, reused from step to step (profiler.cpp)
  std::unique_ptr<GpuMarks> gpu_;
  std::array<double, kNumPhases> current_{};
  std::array<std::vector<double>, kNumPhases> phase_s_;
  std::vector<double> step_s_;
  Clock::time_point step_start_{};
  double step_start_us_ = -1;
  bool in_step_ = false;
};

}  // namespace lancet
