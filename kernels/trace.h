// trace.h — a process-wide recorder of timed scopes, written as a Chrome trace.
//
// Off by default. While off, a TraceScope costs one relaxed atomic load and nothing else, so
// scopes can stay in hot paths (every Module::forward/backward has one). While on, each scope
// records one complete event ("ph":"X"): name, category, start and duration in microseconds
// since the first use of the recorder in this process, and a small per-thread id (1, 2, ...
// in the order threads first record). Recording is thread-safe (one mutex, taken once per
// finished scope). Events past `max_events` are dropped and counted, so a forgotten switch
// cannot eat the memory of a long run.
//
//   set_trace_enabled(true);
//   { TraceScope t("Conv2d", "forward"); ... }
//   write_chrome_trace("runs/a/trace.json");   // open in chrome://tracing or ui.perfetto.dev
//
// Names passed as const char* are copied only when an event is recorded; the pointer must
// stay valid for the life of the scope.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lancet {

namespace detail {
extern std::atomic<bool> g_trace_enabled;
}  // namespace detail

inline bool trace_enabled() { return detail::g_trace_enabled.load(std::memory_order_relaxed); }
// Turns recording on or off; already recorded events are kept (clear_trace() drops them).
void set_trace_enabled(bool on, std::size_t max_events = std::size_t{1} << 22);
void clear_trace();

struct TraceEvent {
  std::string name;
  std::string category;
  double start_us = 0;  // since the recorder's epoch (trace_now_us() = 0 at first use)
  double dur_us = 0;
  uint32_t tid = 0;
};

// Microseconds on the recorder's steady clock.
double trace_now_us();
// Records one complete event on the calling thread, if tracing is on (for spans that are not
// lexical scopes, e.g. a training step opened and closed by two calls).
void record_trace_event(const char* name, const char* category, double start_us, double dur_us);
// A copy of everything recorded so far, in recording order; and how many were dropped.
std::vector<TraceEvent> trace_events();
std::size_t trace_dropped_events();

// Writes {"traceEvents":[...]} to `path` atomically (a temporary file in the same folder,
// then rename), so a reader never sees half a trace. Throws lancet::Error on I/O failure.
void write_chrome_trace(const std::string& path);

// Floating-point work done by the calling thread, counted by the kernels that dominate it:
// conv2d_forward and linear_forward add 2 FLOPs per multiply-add (whichever algorithm runs).
// Pipeline balancing reads the difference across a forward when no timing exists.
void add_thread_flops(int64_t flops) noexcept;
int64_t thread_flops() noexcept;

// NVTX ranges (CUDA builds): every TraceScope is also an NVTX range named after it, always on
// (NVTX costs a pointer test per call unless Nsight Systems / Compute is attached), so
// `nsys profile` shows lancet's phases and layers on its timeline. No-ops without CUDA.
void nvtx_push(const char* name) noexcept;
void nvtx_pop() noexcept;

class TraceScope {
 public:
  TraceScope(const char* name, const char* category) noexcept
      : name_(name), category_(category), start_us_(trace_enabled() ? trace_now_us() : -1) {
    nvtx_push(name);
  }
  ~TraceScope() {
    nvtx_pop();
    if (start_us_ >= 0) finish();
  }
  TraceScope(const TraceScope&) = delete;
  TraceScope& operator=(const TraceScope&) = delete;

 private:
  void finish() noexcept;
  const char* name_;
  const char* category_;
  double start_us_;  // -1: tracing was off when the scope opened, nothing to record
};

}  // namespace lancet
