#include "trainer/pipeline_plan.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <iomanip>
#include <limits>
#include <sstream>
#include <thread>

#include "kernels/elementwise.h"
#include "kernels/parallel.h"
#include "kernels/trace.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace lancet {

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
}  // namespace

PipeSchedule parse_pipe_schedule(const std::string& name) {
  if (name == "gpipe") return PipeSchedule::gpipe;
  if (name == "1f1b") return PipeSchedule::one_f_one_b;
  LANCET_FAIL("pipeline schedule must be gpipe or 1f1b, got '" << name << "'");
}

const char* pipe_schedule_name(PipeSchedule s) { return s == PipeSchedule::gpipe ? "gpipe" : "1f1b"; }

std::vector<PipeOp> stage_schedule(PipeSchedule schedule, int stage, int stages, int m) {
  LANCET_CHECK(stages >= 1 && stage >= 0 && stage < stages && m >= 1,
               "stage_schedule: stage " << stage << " of " << stages << " with " << m << " micro-batches");
  std::vector<PipeOp> ops;
  if (schedule == PipeSchedule::gpipe) {
    for (int i = 0; i < m; ++i) ops.push_back({true, i});
    for (int i = 0; i < m; ++i) ops.push_back({false, i});
    return ops;
  }
  const int warmup = std::min(stages - 1 - stage, m);
  int f = 0, b = 0;
  for (; f < warmup; ++f) ops.push_back({true, f});
  while (f < m) {
    ops.push_back({true, f++});
    ops.push_back({false, b++});
  }
  while (b < m) ops.push_back({false, b++});
  return ops;
}

int max_in_flight(const std::vector<PipeOp>& ops) {
  int now = 0, most = 0;
  for (const PipeOp& op : ops) {
    now += op.forward ? 1 : -1;
    most = std::max(most, now);
  }
  return most;
}

double theoretical_bubble(int stages, int m) {
  return static_cast<double>(stages - 1) / static_cast<double>(m + stages - 1);
}

std::vector<double> measure_unit_seconds(const Units& units, const Tensor& x, const Stream& s, int repeats) {
  LANCET_CHECK(repeats >= 1, "measure_unit_seconds: repeats " << repeats);
  const size_t n = units.size();
  std::vector<double> best(n, std::numeric_limits<double>::infinity());
  for (int r = 0; r <= repeats; ++r) {  // r = 0: warm-up
    std::vector<SavedPtr> saved(n);
    std::vector<double> t(n, 0.0);
    Tensor h = x;
    // synchronize(s): a GPU's work has finished when its time is read (a no-op on the CPU).
    for (size_t i = 0; i < n; ++i) {
      synchronize(s);
      const auto t0 = Clock::now();
      h = units[i].second->forward(h, &saved[i], s);
      synchronize(s);
      t[i] += seconds_since(t0);
    }
    Tensor g = Tensor::full(h.shape(), 1.f / static_cast<float>(h.numel()), h.device());
    if (g.dtype() != h.dtype()) g = cast_to(g, h.dtype(), s);  // 16-bit activations on a GPU
    for (size_t i = n; i-- > 0;) {
      synchronize(s);
      const auto t0 = Clock::now();
      g = units[i].second->backward(g, *saved[i], i > 0, s);
      saved[i].reset();
      synchronize(s);
      t[i] += seconds_since(t0);
    }
    if (r > 0)
      for (size_t i = 0; i < n; ++i) best[i] = std::min(best[i], t[i]);
  }
  for (auto& u : units) u.second->zero_grad();
  return best;
}

std::vector<double> unit_forward_flops(const Units& units, const Tensor& x, const Stream& s) {
  std::vector<double> flops;
  Tensor h = x;
  for (const auto& u : units) {
    const int64_t before = thread_flops();
    h = u.second->forward(h, nullptr, s);
    flops.push_back(static_cast<double>(thread_flops() - before));
  }
  return flops;
}

int balanced_cut(const std::vector<double>& cost) {
  const int n = static_cast<int>(cost.size());
  LANCET_CHECK(n >= 2, "a pipeline of two stages needs at least two units, the model has " << n);
  double total = 0;
  for (double c : cost) total += c;
  int best = 1;
  double best_max = std::numeric_limits<double>::infinity(), best_diff = best_max;
  double head = 0;
  for (int k = 1; k < n; ++k) {
    head += cost[static_cast<size_t>(k - 1)];
    const double tail = total - head;
    const double mx = std::max(head, tail), diff = std::abs(head - tail);
    if (mx < best_max || (mx == best_max && diff < best_diff)) best = k, best_max = mx, best_diff = diff;
  }
  return best;
}

int cut_index(const Units& units, const std::string& name) {
  std::string valid;
  for (size_t i = 1; i < units.size(); ++i) {
    if (units[i].first == name) return static_cast<int>(i);
    valid += (valid.empty() ? "" : ", ") + units[i].first;
  }
  if (!units.empty() && units[0].first == name)
    LANCET_FAIL("pipeline.cut " << name << " is the first unit: stage 0 would be empty; valid cuts: " << valid);
  LANCET_FAIL("pipeline.cut: no unit named '" << name << "'; valid cuts (stage 1's first unit): " << valid);
}

int choose_cut(const std::string& cut, const std::string& balance, const Units& units,
               const std::function<std::unique_ptr<MedicalCNN>()>& make_scratch, const Tensor& x, const Stream& s,
               int threads, std::string* basis) {
  if (cut != "auto") {
    if (basis) *basis = "pipeline.cut";
    return cut_index(units, cut);
  }
  LANCET_CHECK(balance == "time" || balance == "flops", "pipeline.balance must be time or flops, got '" << balance << "'");
  const std::unique_ptr<MedicalCNN> scratch = make_scratch();
  const Units& scratch_units = scratch->units();
  LANCET_CHECK(scratch_units.size() == units.size(), "choose_cut: the scratch model has " << scratch_units.size()
                                                                                          << " units, the model " << units.size());
  scratch->train();
  // The units take what the model's entry makes of x (16-bit on a GPU under fp16 / bf16,
  // channels_last under that memory format).
  const Tensor input = scratch->to_compute(x, s);
  std::vector<double> cost;
  std::exception_ptr err;
  // On the CPU the stages' products run with the stage's threads: measure them so.
  BlasThreadsScope blas(s.device.is_cpu() ? threads : 0);
  std::thread measure([&] {
    try {
#ifdef LANCET_WITH_CUDA
      std::unique_ptr<CudaDeviceGuard> device;
      if (s.device.is_cuda()) device = std::make_unique<CudaDeviceGuard>(s.device.index);
#endif
      set_thread_local_threads(threads);
      cost = balance == "time" ? measure_unit_seconds(scratch_units, input, s) : unit_forward_flops(scratch_units, input, s);
    } catch (...) {
      err = std::current_exception();
    }
  });
  measure.join();
  if (err) std::rethrow_exception(err);
  const int k = balanced_cut(cost);
  if (basis) {
    double head = 0, tail = 0;
    for (size_t i = 0; i < cost.size(); ++i) (static_cast<int>(i) < k ? head : tail) += cost[i];
    std::ostringstream b;
    if (balance == "time")
      b << std::fixed << std::setprecision(1) << "balanced by measured time: " << head * 1e3 << " ms | " << tail * 1e3
        << " ms per micro-batch";
    else
      b << std::fixed << std::setprecision(2) << "balanced by forward FLOPs: " << head / 1e9 << " | " << tail / 1e9
        << " GFLOP per micro-batch";
    *basis = b.str();
  }
  return k;
}

}  // namespace lancet
