// lab/lab.cuh — the kernel lab's shared harness (not part of lancet_kernels): skipping without a
// GPU, filling inputs, the check of a GPU result against its CPU twin, the L2-flushed timer and
// the report. Each kernels/lab/<family>.cu is one binary (lab_<family>) that runs numbered
// versions of one kernel over launch configurations and MedicalCNN shapes; see the "Kernel lab"
// paragraph of docs/design.md for how a winner is promoted.
//
// Contract of a lab binary: every (version, launch configuration) is checked against the CPU
// twin before it is timed, and a failed check is reported and excludes that row from the
// ranking; the exit status is 1 when any check failed, 0 otherwise, and 0 with a line saying so
// where there is no CUDA device.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/cuda/runtime.h"
#include "kernels/tensor.h"

namespace lancet::lab {

// False (after one line on stdout) where no CUDA device exists: the binary then exits 0.
inline bool have_device(const char* binary) {
  const std::vector<CudaDeviceInfo> devs = cuda_devices();
  if (devs.empty()) {
    std::printf("%s: no CUDA device on this machine; nothing measured\n", binary);
    return false;
  }
  std::printf("%s: %s (sm_%d%d, %.0f GiB), CUDA runtime %s\n", binary, devs[0].name.c_str(), devs[0].cc_major,
              devs[0].cc_minor, devs[0].total_bytes / 1073741824.0, cuda_runtime_version().c_str());
  return true;
}

// Deterministic values uniform in [lo, hi) from (seed, index): inputs need not be random, only
// varied and reproducible, and a hash fills 200M elements in well under a second.
inline std::vector<float> uniform(int64_t n, uint64_t seed, float lo, float hi) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (seed + 1) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
    z ^= z >> 29;
    v[static_cast<size_t>(i)] = lo + (hi - lo) * static_cast<float>(z >> 40) * (1.f / 16777216.f);
  }
  return v;
}

// The check of a GPU result against the CPU twin's: every element must satisfy
// |got - ref| <= rtol * (|ref| + 1) (values are O(1); NaN must meet NaN).
struct Check {
  bool ok = true;
  double max_err = 0;  // max |got - ref| / (|ref| + 1)
  int64_t first_bad = -1;
};
inline Check check_close(const std::vector<float>& ref, const std::vector<float>& got, double rtol) {
  Check c;
  if (ref.size() != got.size()) return Check{false, INFINITY, 0};
  for (size_t i = 0; i < ref.size(); ++i) {
    const double r = ref[i], g = got[i];
    if (std::isnan(r) || std::isnan(g)) {
      if (std::isnan(r) != std::isnan(g) && c.ok) c = Check{false, INFINITY, static_cast<int64_t>(i)};
      continue;
    }
    const double e = std::fabs(g - r) / (std::fabs(r) + 1.0);
    c.max_err = std::max(c.max_err, e);
    if (e > rtol && c.ok) {
      c.ok = false;
      c.first_bad = static_cast<int64_t>(i);
    }
  }
  return c;
}

// Evicts the activations from L2 between repetitions by writing a buffer of twice the L2 size
// (llm.c's dev/cuda timer), so that every repetition reads its inputs from HBM as in training.
class L2Flush {
 public:
  L2Flush() {
    int dev = 0, l2 = 0;
    LANCET_CUDA_CHECK(cudaGetDevice(&dev));
    LANCET_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    bytes_ = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
    LANCET_CUDA_CHECK(cudaMalloc(&buf_, bytes_));
  }
  ~L2Flush() { cudaFree(buf_); }
  L2Flush(const L2Flush&) = delete;
  L2Flush& operator=(const L2Flush&) = delete;
  void operator()(const Stream& s) {
    LANCET_CUDA_CHECK(cudaMemsetAsync(buf_, ++value_ & 0xff, bytes_, static_cast<cudaStream_t>(s.native)));
  }

 private:
  void* buf_ = nullptr;
  size_t bytes_ = 0;
  int value_ = 0;
};

// Median milliseconds of `reps` runs of launch() on s, each after an L2 flush (outside the
// timed span), after `warmup` untimed runs. Times with lancet's CudaEvent pair.
template <typename Launch>
double time_ms(Launch&& launch, const Stream& s, L2Flush& flush, int reps = 20, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) launch();
  CudaEvent start(s.device, true), stop(s.device, true);
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    flush(s);
    start.record(s);
    launch();
    stop.record(s);
    stop.synchronize();
    ms.push_back(stop.elapsed_ms_since(start));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

inline std::string shape_label(const Shape& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "x" : "") + std::to_string(s[i]);
  return out;
}

}  // namespace lancet::lab
