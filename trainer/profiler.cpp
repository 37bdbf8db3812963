#include "trainer/profiler.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <sstream>

#include "kernels/error.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace lancet {

#ifdef LANCET_WITH_CUDA
struct StepProfiler::GpuMarks {
  Stream stream;
  // The other devices' streams, each with an event that joins its work into `stream`.
  std::vector<Stream> also;
  std::vector<std::unique_ptr<CudaEvent>> joins;
  // Pairs of timing events, (begin, end) per phase entry this step, and the phase of each pair.
  std::vector<std::unique_ptr<CudaEvent>> events;
  std::vector<Phase> phases;
  size_t used = 0;  // pairs recorded this step
};

void StepProfiler::set_stream(const Stream& s, const std::vector<Stream>& also) {
  LANCET_CHECK(!in_step_, "StepProfiler::set_stream inside a step");
  for (const Stream& a : also)
    LANCET_CHECK(s.device.is_cuda() && a.device.is_cuda() && a.device != s.device,
                 "StepProfiler: a joined stream on " << a.device.str() << " with the timed stream on "
                                                     << s.device.str() << " (both CUDA, different devices)");
  if (s.device.is_cuda()) {
    if (!gpu_ || gpu_->stream.device != s.device) gpu_ = std::make_unique<GpuMarks>();
    gpu_->stream = s;
    gpu_->also = also;
    gpu_->joins.clear();
    for (const Stream& a : also) gpu_->joins.push_back(std::make_unique<CudaEvent>(a.device));
  } else {
    gpu_.reset();
  }
}

int StepProfiler::gpu_mark_begin(Phase p) {
  if (!gpu_ || !in_step_ || p == Phase::data_wait) return -1;
  GpuMarks& g = *gpu_;
  if (2 * g.used == g.events.size()) {
    g.events.push_back(std::make_unique<CudaEvent>(g.stream.device, /*timing=*/true));
    g.events.push_back(std::make_unique<CudaEvent>(g.stream.device, /*timing=*/true));
    g.phases.push_back(p);
  }
  const size_t slot = g.used++;
  g.phases[slot] = p;
  g.events[2 * slot]->record(g.stream);
  return static_cast<int>(slot);
}

void StepProfiler::gpu_mark_end(int slot) {
  // A destructor calls this: a recording error must not escape (the step's result shows it).
  try {
    GpuMarks& g = *gpu_;
    for (size_t i = 0; i < g.also.size(); ++i) {  // the phase ends when the other devices' work has run too
      g.joins[i]->record(g.also[i]);
      g.joins[i]->wait_on(g.stream);
    }
    g.events[2 * static_cast<size_t>(slot) + 1]->record(g.stream);
  } catch (const std::exception&) {
  }
}

void StepProfiler::gpu_resolve_step() {
  if (!gpu_) return;
  GpuMarks& g = *gpu_;
  synchronize(g.stream);
  for (const Stream& a : g.also) synchronize(a);
  std::array<bool, kNumPhases> timed{};
  std::array<double, kNumPhases> gpu_s{};
  for (size_t i = 0; i < g.used; ++i) {
    const int p = static_cast<int>(g.phases[i]);
    timed[p] = true;
    gpu_s[p] += g.events[2 * i + 1]->elapsed_ms_since(*g.events[2 * i]) * 1e-3;
  }
  for (int p = 0; p < kNumPhases; ++p)
    if (timed[p]) current_[p] = gpu_s[p];
  g.used = 0;
}
#else
struct StepProfiler::GpuMarks {
  size_t used = 0;
};
void StepProfiler::set_stream(const Stream& s, const std::vector<Stream>& also) {
  LANCET_CHECK(s.device.is_cpu(), "StepProfiler: stream on " << s.device.str() << " in a build without CUDA");
  LANCET_CHECK(also.empty(), "StepProfiler: a joined stream on " << also.front().device.str()
                                                                  << " in a build without CUDA");
}
int StepProfiler::gpu_mark_begin(Phase) { return -1; }
void StepProfiler::gpu_mark_end(int) {}
void StepProfiler::gpu_resolve_step() {}
#endif

StepProfiler::StepProfiler() = default;
StepProfiler::~StepProfiler() = default;

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::data_wait: return "data_wait";
    case Phase::h2d: return "h2d";
    case Phase::forward: return "forward";
    case Phase::backward: return "backward";
    case Phase::pipeline: return "pipeline";
    case Phase::grad_sync: return "grad_sync";
    case Phase::optimizer: return "optimizer";
  }
  return "?";
}

PhaseStats compute_stats(std::vector<double> samples) {
  PhaseStats st;
  if (samples.empty()) return st;
  std::sort(samples.begin(), samples.end());
  for (const double s : samples) st.total_s += s;
  st.mean_s = st.total_s / static_cast<double>(samples.size());
  auto quantile = [&](double q) {
    const double pos = q * static_cast<double>(samples.size() - 1);
    const std::size_t lo = static_cast<std::size_t>(std::floor(pos));
    const std::size_t hi = std::min(lo + 1, samples.size() - 1);
    return samples[lo] + (pos - static_cast<double>(lo)) * (samples[hi] - samples[lo]);
  };
  st.p50_s = quantile(0.50);
  st.p95_s = quantile(0.95);
  return st;
}

void StepProfiler::begin_step() {
  current_.fill(0.0);
  in_step_ = true;
  if (gpu_) gpu_->used = 0;
  step_start_ = Clock::now();
  step_start_us_ = trace_enabled() ? trace_now_us() : -1;
}

void StepProfiler::end_step() {
  LANCET_CHECK(in_step_, "StepProfiler: end_step() without begin_step()");
  gpu_resolve_step();  // on a GPU: the step ends when its work has run
  end_step(std::chrono::duration<double>(Clock::now() - step_start_).count());
}

void StepProfiler::end_step(double step_seconds) {
  if (step_start_us_ >= 0) record_trace_event("step", "step", step_start_us_, trace_now_us() - step_start_us_);
  for (int i = 0; i < kNumPhases; ++i) phase_s_[i].push_back(current_[i]);
  step_s_.push_back(step_seconds);
  current_.fill(0.0);
  in_step_ = false;
  step_start_us_ = -1;
}

PhaseStats StepProfiler::other_stats() const {
  std::vector<double> other(step_s_.size());
  for (std::size_t k = 0; k < step_s_.size(); ++k) {
    double covered = 0;
    for (int i = 0; i < kNumPhases; ++i) covered += phase_s_[i][k];
    other[k] = std::max(0.0, step_s_[k] - covered);
  }
  return compute_stats(std::move(other));
}

namespace {

Json stats_json(const PhaseStats& st, double step_total_s, bool with_share) {
  Json j = {{"mean_ms", st.mean_s * 1e3}, {"p50_ms", st.p50_s * 1e3}, {"p95_ms", st.p95_s * 1e3},
            {"total_s", st.total_s}};
  if (with_share) j["share"] = step_total_s > 0 ? st.total_s / step_total_s : 0.0;
  return j;
}

void table_row(std::ostringstream& os, const char* name, const PhaseStats& st, double step_total_s, bool share) {
  os << std::left << std::setw(10) << name << std::right << std::fixed << std::setprecision(3) << std::setw(11)
     << st.mean_s * 1e3 << std::setw(11) << st.p50_s * 1e3 << std::setw(11) << st.p95_s * 1e3;
  if (share) os << std::setprecision(1) << std::setw(8) << (step_total_s > 0 ? 100 * st.total_s / step_total_s : 0.0) << "%";
  os << "\n";
}

}  // namespace

std::string StepProfiler::table() const {
  const PhaseStats step = step_stats();
  std::ostringstream os;
  os << std::left << std::setw(10) << "phase" << std::right << std::setw(11) << "mean ms" << std::setw(11) << "p50 ms"
     << std::setw(11) << "p95 ms" << std::setw(9) << "share" << "\n";
  for (int i = 0; i < kNumPhases; ++i) {
    const Phase p = static_cast<Phase>(i);
    if (p == Phase::pipeline && stats(p).total_s == 0) continue;  // not a pipelined run
    table_row(os, phase_name(p), stats(p), step.total_s, true);
  }
  table_row(os, "other", other_stats(), step.total_s, true);
  table_row(os, "step", step, step.total_s, false);
  return os.str();
}

Json StepProfiler::to_json() const {
  const PhaseStats step = step_stats();
  Json phases = Json::object();
  for (int i = 0; i < kNumPhases; ++i)
    phases[phase_name(static_cast<Phase>(i))] = stats_json(stats(static_cast<Phase>(i)), step.total_s, true);
  phases["other"] = stats_json(other_stats(), step.total_s, true);
  return {{"steps", steps()}, {"step", stats_json(step, step.total_s, false)}, {"phases", phases}};
}

void StepProfiler::reset() {
  current_.fill(0.0);
  for (auto& v : phase_s_) v.clear();
  step_s_.clear();
  in_step_ = false;
  step_start_us_ = -1;
  if (gpu_) gpu_->used = 0;
}

}  // namespace lancet
