#include "kernels/blas.h"

#include <cblas.h>

#include <string>

namespace lancet {

void sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k,
              alpha, a, lda, b, ldb, beta, c, ldc);
}

void blas_set_num_threads(int n) { openblas_set_num_threads(n); }
int blas_num_threads() { return openblas_get_num_threads(); }

std::string blas_info() {
  std::string s = "OpenBLAS";
  if (const char* cfg = openblas_get_config()) s += std::string(" (") + cfg + ")";
  if (const char* core = openblas_get_corename()) s += std::string(" core ") + core;
  return s;
}

}  // namespace lancet
