// pipeline_plan.h — planning a two-stage pipeline (trainer/pipeline.h runs it): the GPipe and
// 1F1B schedules of each stage, their activation memory and bubble, and where to cut the model's
// chain of units (by measured time, by FLOPs, or at a named unit).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/tensor.h"
#include "layers/medicalcnn.h"
#include "layers/module.h"

namespace lancet {

enum class PipeSchedule { gpipe, one_f_one_b };
PipeSchedule parse_pipe_schedule(const std::string& name);  // "gpipe" | "1f1b"
const char* pipe_schedule_name(PipeSchedule s);

struct PipeOp {
  bool forward = true;
  int micro = 0;
  bool operator==(const PipeOp& o) const { return forward == o.forward && micro == o.micro; }
};
// What stage `stage` of `stages` runs, in order, for `micro_batches` micro-batches:
//   gpipe  F0 F1 .. F(m-1) B0 B1 .. B(m-1)
//   1f1b   min(stages - 1 - stage, m) warm-up forwards, then one forward and one backward in
//          turn, then the remaining backwards (PipeDream-Flush): at most stages - stage
//          micro-batches in flight.
std::vector<PipeOp> stage_schedule(PipeSchedule schedule, int stage, int stages, int micro_batches);
// The most micro-batches whose forward has run and whose backward has not, along `ops`.
int max_in_flight(const std::vector<PipeOp>& ops);
// The bubble of a pipeline of `stages` equal stages over `micro_batches`: (p - 1) / (m + p - 1).
double theoretical_bubble(int stages, int micro_batches);

using Units = std::vector<std::pair<std::string, Module*>>;

// Per-unit costs for choosing a cut, measured on `x` (one micro-batch) with the calling
// thread's kernels. They run forwards (and backwards) of the units: BatchNorm statistics and
// dropout counters move, so measure a scratch copy of the model, not the one being trained.
// Seconds of forward + backward in training mode, the best of `repeats` after one warm-up:
std::vector<double> measure_unit_seconds(const Units& units, const Tensor& x, const Stream& s, int repeats = 2);
// Forward FLOPs of the convolutions and linear layers (add_thread_flops), inference mode:
std::vector<double> unit_forward_flops(const Units& units, const Tensor& x, const Stream& s);
// The index of stage 1's first unit that minimises the larger stage's total (ties: the more
// even split), in [1, n).
int balanced_cut(const std::vector<double>& cost);
// The index of the unit named `name`, which must be a valid cut (not the first unit); throws
// listing the valid names.
int cut_index(const Units& units, const std::string& name);

// pipeline.cut resolved: the index of the named unit, or for "auto" the balanced cut of costs
// (pipeline.balance: "time" or "flops") measured on a model from make_scratch() — built like the
// real one (measuring moves its BatchNorm statistics and dropout counters) — on input x, in a thread of
// its own running `threads` kernel threads (one stage's). `basis` receives a line for the log
// ("balanced by measured time: 12.6 ms | 10.1 ms per micro-batch").
int choose_cut(const std::string& cut, const std::string& balance, const Units& units,
               const std::function<std::unique_ptr<MedicalCNN>()>& make_scratch, const Tensor& x, const Stream& s,
               int threads, std::string* basis);

}  // namespace lancet
