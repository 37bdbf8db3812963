#include "kernels/parallel.h"

#include <atomic>

#include "kernels/blas.h"
#include "kernels/error.h"

namespace lancet {

namespace {
std::atomic<int> g_threads{0};
thread_local int t_threads = 0;
}

void set_num_threads(int n) {
  LANCET_CHECK(n >= 1, "thread count must be at least 1, got " << n);
  g_threads = n;
  omp_set_num_threads(n);
  blas_set_num_threads(n);
}

void set_thread_local_threads(int n) {
  LANCET_CHECK(n >= 0, "thread count must not be negative, got " << n);
  t_threads = n;
  if (n > 0) omp_set_num_threads(n);
}

BlasThreadsScope::BlasThreadsScope(int n) {
  if (n <= 0) return;
  previous_ = blas_num_threads();
  if (previous_ == n) previous_ = 0;
  else blas_set_num_threads(n);
}

BlasThreadsScope::~BlasThreadsScope() {
  if (previous_ > 0) blas_set_num_threads(previous_);
}

int num_threads() {
  if (t_threads > 0) return t_threads;
  int n = g_threads.load();
  if (n == 0) {
    n = omp_get_max_threads();
    g_threads = n;
  }
  return n;
}

}  // namespace lancet
