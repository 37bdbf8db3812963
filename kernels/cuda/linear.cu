// cuda/linear.cu — the Linear twins on cuBLASLt.
//
// A row-major [rows, cols] buffer is the column-major [cols x rows] matrix, its transpose, so
// each row-major product is computed transposed in cuBLAS's column-major terms:
//   forward  y = x w^T + b  as  y^T [out x N] = op_T(w as [in x out]) * (x as [in x N])
//   dx = dy w               as  dx^T [in x N] = (w as [in x out]) * (dy as [out x N])      beta 0
//   dw += dy^T x            as  dw^T [in x out] += (x as [in x N]) * op_T(dy as [out x N]) beta 1
//                           (dw f32 with f16/bf16 x and dy under mixed precision: the GEMM
//                           accumulates into the FP32 gradient, no 16-bit intermediate)
// The bias rides in the GEMM's epilogue (CUBLASLT_EPILOGUE_BIAS adds bias[row] of the
// column-major result, i.e. b[o] to every y[n, o]); cuBLASLt reads the bias in the output's
// dtype, so an f16/bf16 GEMM gets a rounded copy of b. If no algorithm offers the epilogue, a
// lancet kernel adds b instead; a product cuBLASLt has no algorithm for at all goes to
// cublasGemmEx. db is a lancet reduction (conv_util.h). Products accumulate in
// f32 (TF32 for f32 inputs only when allow_tf32()); alpha and beta are f32.
#include <cstdint>

#include "kernels/conv.h"  // allow_tf32
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/conv_util.h"
#include "kernels/cuda/libraries.h"
#include "kernels/cuda/linear.h"
#include "kernels/trace.h"

namespace lancet::cuda {
namespace {

constexpr size_t kLtWorkspace = size_t{32} << 20;  // NVIDIA's recommendation for Hopper

class MatmulDesc {
 public:
  explicit MatmulDesc(cublasComputeType_t ct) { LANCET_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d_, ct, CUDA_R_32F)); }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(d_); }
  MatmulDesc(const MatmulDesc&) = delete;
  MatmulDesc& operator=(const MatmulDesc&) = delete;
  template <typename V> void set(cublasLtMatmulDescAttributes_t a, const V& v) {
    LANCET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d_, a, &v, sizeof(v)));
  }
  cublasLtMatmulDesc_t get() const { return d_; }

 private:
  cublasLtMatmulDesc_t d_ = nullptr;
};

// A column-major rows x cols matrix with leading dimension ld.
class Layout {
 public:
  Layout(cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld) {
    LANCET_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&d_, t, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld));
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(d_); }
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
  cublasLtMatrixLayout_t get() const { return d_; }

 private:
  cublasLtMatrixLayout_t d_ = nullptr;
};

class Preference {
 public:
  Preference() { LANCET_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d_)); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(d_); }
  Preference(const Preference&) = delete;
  Preference& operator=(const Preference&) = delete;
  template <typename V> void set(cublasLtMatmulPreferenceAttributes_t a, const V& v) {
    LANCET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d_, a, &v, sizeof(v)));
  }
  cublasLtMatmulPreference_t get() const { return d_; }

 private:
  cublasLtMatmulPreference_t d_ = nullptr;
};

// The largest power of two up to 256 dividing p's address: algorithms that assume more (the
// heuristic's default is 256) are excluded, since views may start anywhere in a storage.
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 1;
  while (al < 256 && a % (2 * al) == 0) al *= 2;
  return al;
}

// Column-major D [m x n] = op(A) op(B) + beta D (+ bias[row]), op(A) m x k, op(B) k x n. A is
// stored (ta ? k x m : m x k) with leading dimension lda, B (tb ? n x k : k x n) with ldb; D
// is dense (ldd = m). A and B share one dtype; D has that dtype too, or f32 with f16/bf16
// A and B (the mixed-precision weight gradient: cuBLASLt's Atype = Btype = 16F/16BF,
// Ctype = Dtype = 32F with CUBLAS_COMPUTE_32F, also a cublasGemmEx combination). bias [m] in
// D's dtype, or null.
struct Gemm {
  bool ta, tb;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  float beta;
  const void* bias;
  DType d_dtype;
};

// The same product through cublasGemmEx, for when cuBLASLt's heuristic offers no algorithm
// (a safety net: cuBLAS proper covers every size, with int dimensions).
void gemm_ex(const Gemm& g, cudaDataType_t t, cudaDataType_t dt, cublasComputeType_t ct, const Stream& s,
             const char* op) {
  constexpr int64_t kMax = 2147483647;
  LANCET_CHECK(g.m <= kMax && g.n <= kMax && g.k <= kMax && g.lda <= kMax && g.ldb <= kMax,
               op << ": GEMM of " << g.m << " x " << g.n << " x " << g.k << " exceeds cuBLAS's int32 sizes");
  const float alpha = 1.f;
  LANCET_CUBLAS_CHECK(cublasGemmEx(cublas_handle(s), g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, g.tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   static_cast<int>(g.m), static_cast<int>(g.n), static_cast<int>(g.k), &alpha, g.a, t,
                                   static_cast<int>(g.lda), g.b, t, static_cast<int>(g.ldb), &g.beta, g.d, dt,
                                   static_cast<int>(g.m), ct, CUBLAS_GEMM_DEFAULT));
}

// Enqueues the product on s. Returns false (having done nothing) only when a bias was asked
// for and no algorithm offers the bias epilogue; then the caller adds it.
bool lt_matmul(const Gemm& g, DType dt, const Stream& s, const char* op) {
  if (g.m == 0 || g.n == 0) return true;
  if (g.k == 0) {  // an empty sum: D = beta D
    if (g.bias) return false;
    if (g.beta == 0.f)
      LANCET_CUDA_CHECK(cudaMemsetAsync(g.d, 0, static_cast<size_t>(g.m * g.n) * dtype_size(g.d_dtype), native(s)));
    return true;
  }
  const cudaDataType_t t = cuda_dtype(dt, op);
  const cudaDataType_t td = cuda_dtype(g.d_dtype, op);
  const cublasComputeType_t ct =
      dt == DType::f32 && allow_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  MatmulDesc desc(ct);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, g.ta ? CUBLAS_OP_T : CUBLAS_OP_N);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, g.tb ? CUBLAS_OP_T : CUBLAS_OP_N);
  if (g.bias) {
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  }
  const Layout la(t, g.ta ? g.k : g.m, g.ta ? g.m : g.k, g.lda);
  const Layout lb(t, g.tb ? g.n : g.k, g.tb ? g.k : g.n, g.ldb);
  const Layout ld(td, g.m, g.n, g.m);
  Preference pref;
  pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t{kLtWorkspace});
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(g.a));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(g.b));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(g.d));
  pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(g.d));
  cublasLtHandle_t lt = cublaslt_handle(s.device);
  cublasLtMatmulHeuristicResult_t res{};
  int count = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, desc.get(), la.get(), lb.get(), ld.get(), ld.get(),
                                                           pref.get(), 1, &res, &count);
  if (st != CUBLAS_STATUS_SUCCESS || count == 0) {
    if (g.bias) return false;
    gemm_ex(g, t, td, ct, s, op);
    return true;
  }
  Tensor ws = workspace(s, res.workspaceSize);
  const float alpha = 1.f;
  LANCET_CUBLAS_CHECK(cublasLtMatmul(lt, desc.get(), &alpha, g.a, la.get(), g.b, lb.get(), &g.beta, g.d, ld.get(),
                                     g.d, ld.get(), &res.algo, ws.defined() ? ws.raw_data() : nullptr,
                                     res.workspaceSize, native(s)));
  return true;
}

struct Dims {
  int64_t N, in, out;
};

Dims check(const char* op, const Tensor& x, const Tensor& w, const Stream& s,
           std::initializer_list<const Tensor*> others) {
  require_cuda(op, s, x, others);
  cuda_dtype(x.dtype(), op);  // f32, f16 or bf16, else throws naming op
  require_defined(op, "weight", w);
  require_dtype(op, "weight", w, x.dtype());
  LANCET_CHECK(x.ndim() == 2 && w.ndim() == 2 && x.dim(1) == w.dim(1), op << ": input " << x.shape_str()
                                                                          << " does not fit weight " << w.shape_str()
                                                                          << " (need [N, in] and [out, in])");
  return {x.dim(0), x.dim(1), w.dim(0)};
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, const Stream& s) {
  const char* op = "linear_forward";
  const Dims d = check(op, x, w, s, {&w, &b, &y});
  require_shape(op, "output", y, {d.N, d.out}, desc("input", x) + " and " + desc("weight", w));
  require_dtype(op, "output", y, x.dtype());
  if (b.defined()) {
    require_shape(op, "bias", b, {d.out}, desc("weight", w));
    require_dtype(op, "bias", b, DType::f32);
  }
  if (y.numel() == 0) return;
  add_thread_flops(2 * d.N * d.in * d.out);
  CudaDeviceGuard guard(s.device.index);
  Tensor bias;  // b in y's dtype, as the epilogue reads it
  if (b.defined()) {
    bias = b;
    if (x.dtype() != DType::f32) {
      bias = Tensor::empty({d.out}, x.dtype(), x.device());
      cast_from_f32(b, bias, s);
    }
  }
  Gemm g{true, false, d.out, d.N, d.in, w.raw_data(), d.in, x.raw_data(), d.in, y.raw_data(), 0.f,
         bias.defined() ? bias.raw_data() : nullptr, x.dtype()};
  if (!lt_matmul(g, x.dtype(), s, op)) {
    g.bias = nullptr;
    lt_matmul(g, x.dtype(), s, op);
    add_channel_bias(y, b, s);
  }
}

void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor& db,
                     const Stream& s) {
  const char* op = "linear_backward";
  const Dims d = check(op, x, w, s, {&w, &dy, &dx, &dw, &db});
  require_shape(op, "dy", dy, {d.N, d.out}, desc("input", x) + " and " + desc("weight", w));
  require_dtype(op, "dy", dy, x.dtype());
  if (dx.defined()) {
    LANCET_CHECK(dx.shape() == x.shape(),
                 op << ": dx " << dx.shape_str() << " does not match input " << x.shape_str());
    require_dtype(op, "dx", dx, x.dtype());
  }
  if (dw.defined()) {
    LANCET_CHECK(dw.shape() == w.shape(),
                 op << ": dw " << dw.shape_str() << " does not match weight " << w.shape_str());
    // Mixed precision: an f32 dw (the FP32 master's gradient) with f16/bf16 operands.
    if (dw.dtype() != DType::f32) require_dtype(op, "dw", dw, x.dtype());
  }
  if (db.defined()) {
    require_shape(op, "db", db, {d.out}, desc("weight", w));
    require_dtype(op, "db", db, DType::f32);
  }
  CudaDeviceGuard guard(s.device.index);
  if (dx.defined())
    lt_matmul({false, false, d.in, d.N, d.out, w.raw_data(), d.in, dy.raw_data(), d.out, dx.raw_data(), 0.f, nullptr,
               x.dtype()},
              x.dtype(), s, op);
  if (dw.defined())
    lt_matmul({false, true, d.in, d.out, d.N, x.raw_data(), d.in, dy.raw_data(), d.out, dw.raw_data(), 1.f, nullptr,
               dw.dtype()},
              x.dtype(), s, op);
  if (db.defined()) accumulate_channel_sum(dy, db, s);
}

}  // namespace lancet::cuda
