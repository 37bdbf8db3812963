// blas.h — the BLAS the CPU path runs its matrix products on (OpenBLAS via CMake's FindBLAS).
// Row-major wrappers; no hand-rolled GEMM anywhere in lancet.
#pragma once
#include <string>

namespace lancet {

// C[m,n] = alpha * op(A) * op(B) + beta * C, row-major, lda/ldb/ldc are row strides.
void sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc);

void blas_set_num_threads(int n);
int blas_num_threads();
std::string blas_info();  // e.g. "OpenBLAS 0.3.21 (Haswell, 2 threads)"

}  // namespace lancet
