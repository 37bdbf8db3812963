// parallel.h — the CPU thread setting and the one parallel-for every CPU kernel uses.
//
// set_num_threads(n) sets both lancet's own worker count (OpenMP) and the BLAS's, so a
// single setting controls all CPU compute; n = 1 is the serial baseline.
#pragma once
#include <cstdint>

namespace lancet {

void set_num_threads(int n);  // n >= 1
// The calling thread's own count, overriding set_num_threads for the parallel regions this
// thread opens (n = 0 follows the process setting again). Pipeline stages running as threads of
// one process split the cores this way. The BLAS's count stays process-wide (BlasThreadsScope).
void set_thread_local_threads(int n);
int num_threads();

// For a scope in which several threads call the BLAS at once (pipeline stages on the CPU, each
// with n threads of its own): the BLAS's process-wide count set to n, restored at the end; n <= 0
// changes nothing. OpenBLAS's pthread build (Debian's 0.3.21) has one count and one pool of
// server threads per process: a stage's product run with the process's count queues behind the
// other stage's on that pool, which made two 1-thread CPU stages compute 1.5-1.8x slower side
// by side than alone (docs/benchmarks.md); with n = 1 each call runs on its caller's thread.
class BlasThreadsScope {
 public:
  explicit BlasThreadsScope(int n);
  ~BlasThreadsScope();
  BlasThreadsScope(const BlasThreadsScope&) = delete;
  BlasThreadsScope& operator=(const BlasThreadsScope&) = delete;

 private:
  int previous_ = 0;
};

// Calls fn(begin, end) on disjoint chunks covering [0, n). Runs inline when n is small
// (below `grain` items per thread) or when called from inside another parallel region.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& fn);

}  // namespace lancet

#include <omp.h>

namespace lancet {

template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  const int nt = num_threads();
  if (nt <= 1 || n <= grain || omp_in_parallel()) {
    fn(int64_t{0}, n);
    return;
  }
  int64_t chunks = n / (grain < 1 ? 1 : grain);
  const int workers = static_cast<int>(chunks < nt ? (chunks < 1 ? 1 : chunks) : nt);
#pragma omp parallel num_threads(workers)
  {
    const int t = omp_get_thread_num();
    const int64_t begin = n * t / workers;
    const int64_t end = n * (t + 1) / workers;
    if (begin < end) fn(begin, end);
  }
}

}  // namespace lancet
