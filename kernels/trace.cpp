#include "kernels/trace.h"

#if defined(LANCET_WITH_CUDA) && __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>  // header-only NVTX 3 (CUDA toolkit)
#define LANCET_HAVE_NVTX 1
#endif

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>

#include "kernels/error.h"

namespace lancet {

namespace detail {
std::atomic<bool> g_trace_enabled{false};
}  // namespace detail

namespace {

using Clock = std::chrono::steady_clock;

struct Recorder {
  std::mutex mu;
  std::vector<TraceEvent> events;
  std::size_t max_events = std::size_t{1} << 22;
  std::size_t dropped = 0;
};

Recorder& recorder() {
  static Recorder r;
  return r;
}

Clock::time_point epoch() {
  static const Clock::time_point t0 = Clock::now();
  return t0;
}

uint32_t this_thread_tid() {
  static std::atomic<uint32_t> next{1};
  thread_local const uint32_t tid = next.fetch_add(1, std::memory_order_relaxed);
  return tid;
}

void append_json_string(std::string& out, const std::string& s) {
  out += '"';
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

}  // namespace

void set_trace_enabled(bool on, std::size_t max_events) {
  epoch();  // fix the time origin before the first event
  {
    std::lock_guard<std::mutex> lock(recorder().mu);
    recorder().max_events = max_events;
  }
  detail::g_trace_enabled.store(on, std::memory_order_relaxed);
}

void clear_trace() {
  std::lock_guard<std::mutex> lock(recorder().mu);
  recorder().events.clear();
  recorder().dropped = 0;
}

double trace_now_us() { return std::chrono::duration<double, std::micro>(Clock::now() - epoch()).count(); }

void record_trace_event(const char* name, const char* category, double start_us, double dur_us) {
  if (!trace_enabled()) return;
  TraceEvent e{name ? name : "", category ? category : "", start_us, dur_us, this_thread_tid()};
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.events.size() >= r.max_events) {
    ++r.dropped;
    return;
  }
  r.events.push_back(std::move(e));
}

void TraceScope::finish() noexcept {
  try {
    const double end = trace_now_us();
    record_trace_event(name_, category_, start_us_, end - start_us_);
  } catch (...) {
    // out of memory while tracing: the event is lost, the traced work is not disturbed
  }
}

std::vector<TraceEvent> trace_events() {
  std::lock_guard<std::mutex> lock(recorder().mu);
  return recorder().events;
}

std::size_t trace_dropped_events() {
  std::lock_guard<std::mutex> lock(recorder().mu);
  return recorder().dropped;
}

void write_chrome_trace(const std::string& path) {
  std::size_t dropped = 0;
  const std::vector<TraceEvent> events = [&] {
    std::lock_guard<std::mutex> lock(recorder().mu);
    dropped = recorder().dropped;
    return recorder().events;
  }();
  const long pid = static_cast<long>(getpid());
  std::string out = "{\"traceEvents\":[";
  char num[96];
  for (std::size_t i = 0; i < events.size(); ++i) {
    const TraceEvent& e = events[i];
    out += i ? ",\n" : "\n";
    out += "{\"name\":";
    append_json_string(out, e.name);
    out += ",\"cat\":";
    append_json_string(out, e.category);
    std::snprintf(num, sizeof num, ",\"ph\":\"X\",\"ts\":%.3f,\"dur\":%.3f,\"pid\":%ld,\"tid\":%u}", e.start_us,
                  e.dur_us, pid, e.tid);
    out += num;
  }
  std::snprintf(num, sizeof num, "\n],\"displayTimeUnit\":\"ms\",\"otherData\":{\"dropped_events\":%zu}}\n", dropped);
  out += num;

  const std::string tmp = path + ".tmp." + std::to_string(pid);
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    LANCET_CHECK(f.good(), "write_chrome_trace: cannot create " << tmp);
    f.write(out.data(), static_cast<std::streamsize>(out.size()));
    f.flush();
    if (!f.good()) {
      f.close();
      std::remove(tmp.c_str());
      LANCET_FAIL("write_chrome_trace: error writing " << tmp);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    LANCET_FAIL("write_chrome_trace: cannot rename " << tmp << " to " << path);
  }
}

#ifdef LANCET_HAVE_NVTX
void nvtx_push(const char* name) noexcept { nvtxRangePushA(name); }
void nvtx_pop() noexcept { nvtxRangePop(); }
#else
void nvtx_push(const char*) noexcept {}
void nvtx_pop() noexcept {}
#endif

namespace {
thread_local int64_t t_flops = 0;
}
void add_thread_flops(int64_t flops) noexcept { t_flops += flops; }
int64_t thread_flops() noexcept { return t_flops; }

}  // namespace lancet
