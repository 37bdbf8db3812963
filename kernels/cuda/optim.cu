// cuda/optim.cu — CUDA twins of kernels/optim.cpp: SGD and Adam/AdamW steps, the gradient
// norm, the finite checks and the loss-scale unscale, all over lists of tensors at once.
//
// Multi-tensor launches (the idea of PyTorch's multi_tensor_apply): the host cuts every tensor
// into chunks of kChunk elements and fills a TensorTable — up to Capacity<Depth> tensors (each
// a row of Depth pointers: param, grad, state...) and up to kMaxBlocks chunks — which travels
// to the kernel by value as a kernel parameter (kept under the 4 KB that every toolkit
// allows). Block b of a launch processes chunk chunk_of_block[b] of tensor tensor_of_block[b];
// threads stride through the chunk, so loads are coalesced and no two blocks touch the same
// element. A table that fills up is launched and the next one starts (a tensor whose chunks
// span two tables appears in both). A model's parameters take a few launches on one stream.
// A tensor may appear only once in a call's lists (elements are updated without ordering).
//
// Per-element formulas are those of the CPU ops, in float, with the scalars computed on the
// host exactly as there; nvcc may contract a*b+c into one fma, so a step differs from the CPU
// by a few ulps. Products that stand for a separate pass on the CPU (the gradient unscale, the
// clip) use __fmul_rn so they are never contracted and round exactly like it.
#include "kernels/cuda/optim.h"

#include <array>
#include <cmath>
#include <cstring>

#include "kernels/cuda/common.cuh"

namespace lancet::cuda {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per block
constexpr int kMaxBlocks = 320;      // chunks per launch
constexpr int kThreads = 512;        // per block: a multiple of 32 (block_sum), <= 1024

// Tensors per table for a given number of pointers per tensor (sizes as PyTorch's).
template <int Depth> struct Capacity;
template <> struct Capacity<1> { static constexpr int tensors = 110; };
template <> struct Capacity<3> { static constexpr int tensors = 48; };
template <> struct Capacity<4> { static constexpr int tensors = 36; };

template <int Depth>
struct TensorTable {
  static constexpr int kMaxTensors = Capacity<Depth>::tensors;
  int64_t first_block;  // the global index (over all launches of a call) of this launch's block 0
  float* ptr[Depth][kMaxTensors];  // row d of tensor i; read-only rows (gradients) are never written
  int64_t numel[kMaxTensors];
  int32_t chunk_of_block[kMaxBlocks];
  uint8_t tensor_of_block[kMaxBlocks];
};
// Kernel parameters: the table plus at most a few dozen bytes of scalars, under 4096 bytes.
static_assert(sizeof(TensorTable<1>) <= 3900 && sizeof(TensorTable<3>) <= 3900 && sizeof(TensorTable<4>) <= 3900,
              "a TensorTable must stay under the 4 KB kernel parameter limit");
static_assert(Capacity<1>::tensors <= 256, "tensor_of_block is a uint8_t");

// One row of a table: the Depth pointers of one tensor and its element count.
template <int Depth>
struct Row {
  std::array<float*, Depth> ptr;
  int64_t numel;
};

int64_t total_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Calls launch(table, blocks) for consecutive tables covering every chunk of every row, in row
// order, chunks in order; table.first_block counts the blocks of the earlier launches. Rows
// with no elements are left out.
template <int Depth, typename Launch>
void for_each_table(const std::vector<Row<Depth>>& rows, Launch&& launch) {
  constexpr int kMaxTensors = TensorTable<Depth>::kMaxTensors;
  TensorTable<Depth> table;
  std::memset(&table, 0, sizeof table);
  int tensors = 0, blocks = 0;
  for (const Row<Depth>& r : rows) {
    if (r.numel == 0) continue;
    for (int d = 0; d < Depth; ++d) table.ptr[d][tensors] = r.ptr[d];
    table.numel[tensors] = r.numel;
    ++tensors;
    const int64_t chunks = total_chunks(r.numel);
    for (int64_t c = 0; c < chunks; ++c) {
      table.tensor_of_block[blocks] = static_cast<uint8_t>(tensors - 1);
      table.chunk_of_block[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      if (blocks < kMaxBlocks && !(last_chunk && tensors == kMaxTensors)) continue;
      launch(table, blocks);
      table.first_block += blocks;
      blocks = 0;
      if (last_chunk) {
        tensors = 0;
      } else {  // the rest of this tensor's chunks go to the next table, where it is tensor 0
        for (int d = 0; d < Depth; ++d) table.ptr[d][0] = table.ptr[d][tensors - 1];
        table.numel[0] = table.numel[tensors - 1];
        tensors = 1;
      }
    }
  }
  if (blocks > 0) launch(table, blocks);
}

// The part of a tensor this block owns: elements [begin, begin + n) of tensor `tensor`.
struct Chunk {
  int tensor;
  int64_t begin;
  int n;
};

template <int Depth>
__device__ __forceinline__ Chunk block_chunk(const TensorTable<Depth>& t) {
  const int tensor = t.tensor_of_block[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(t.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t left = t.numel[tensor] - begin;  // >= 1: the host only lists chunks that exist
  return {tensor, begin, static_cast<int>(left < kChunk ? left : kChunk)};
}

__device__ __forceinline__ bool is_finite(float x) {  // exponent bits all ones: inf or NaN
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// ---- SGD ------------------------------------------------------------------------------------

struct SgdScalars {
  float lr, momentum, keep, weight_decay, grad_scale_inv;
  bool nesterov, first_step, has_buf;
};

// Rows: param, grad, momentum buffer (null when has_buf is false). As sgd_step in optim.cpp.
__global__ void sgd_kernel(const __grid_constant__ TensorTable<3> t, const SgdScalars a) {
  const Chunk c = block_chunk(t);
  float* w = t.ptr[0][c.tensor] + c.begin;
  const float* g = t.ptr[1][c.tensor] + c.begin;
  float* buf = a.has_buf ? t.ptr[2][c.tensor] + c.begin : nullptr;
  for (int i = threadIdx.x; i < c.n; i += blockDim.x) {
    const float wi = w[i];
    float d = __fmul_rn(g[i], a.grad_scale_inv);  // exact when the scale is 1
    if (a.weight_decay != 0.f) d = d + a.weight_decay * wi;
    if (buf) {
      const float b = a.first_step ? d : buf[i] * a.momentum + a.keep * d;
      buf[i] = b;
      d = a.nesterov ? d + a.momentum * b : b;
    }
    w[i] = wi + (-a.lr) * d;
  }
}

// ---- Adam / AdamW ---------------------------------------------------------------------------

struct AdamScalars {
  float step_size, bc2_sqrt, decay, w1, w2, weight_decay, beta2, eps, grad_scale_inv;
  bool decoupled;
};

// Rows: param, grad, exp_avg, exp_avg_sq. As adam_step in optim.cpp.
__global__ void adam_kernel(const __grid_constant__ TensorTable<4> t, const AdamScalars a) {
  const Chunk c = block_chunk(t);
  float* w = t.ptr[0][c.tensor] + c.begin;
  const float* g = t.ptr[1][c.tensor] + c.begin;
  float* m = t.ptr[2][c.tensor] + c.begin;
  float* v = t.ptr[3][c.tensor] + c.begin;
  for (int i = threadIdx.x; i < c.n; i += blockDim.x) {
    float wi = w[i];
    float gi = __fmul_rn(g[i], a.grad_scale_inv);
    if (a.weight_decay != 0.f) {
      if (a.decoupled)
        wi = wi * a.decay;
      else
        gi = gi + a.weight_decay * wi;
    }
    float mi = m[i];
    mi = a.w1 < 0.5f ? mi + a.w1 * (gi - mi) : gi - (gi - mi) * (1.f - a.w1);  // torch's lerp_
    const float vi = v[i] * a.beta2 + a.w2 * gi * gi;
    const float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;  // IEEE sqrt and division (no fast math)
    m[i] = mi;
    v[i] = vi;
    w[i] = wi + (-a.step_size) * (mi / denom);
  }
}

// ---- norms, finite checks, scaling -------------------------------------------------------------

// partial[first_block + b] = sum of squares of block b's chunk, in double. The thread split and
// the reduction tree are fixed, so every run gives the same bits.
__global__ void sum_squares_kernel(const __grid_constant__ TensorTable<1> t, double* partial) {
  __shared__ double shared[32];
  const Chunk c = block_chunk(t);
  const float* x = t.ptr[0][c.tensor] + c.begin;
  double acc = 0;
  for (int i = threadIdx.x; i < c.n; i += blockDim.x) {
    const double xi = x[i];
    acc += xi * xi;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[t.first_block + blockIdx.x] = acc;
}

// *out = sum of partial[0, n) in a fixed order; launched as one block.
__global__ void sum_kernel(const double* partial, int64_t n, double* out) {
  __shared__ double shared[32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = acc;
}

// Check: *nonfinite = 1 when an element is NaN or inf (it is cleared to 0 before the first
// launch; blocks only ever write 1, so the race between them is harmless). Scale: every element
// x becomes x * scale, after the check read it (torch's _amp_foreach_non_finite_check_and_unscale_).
template <bool Check, bool Scale>
__global__ void check_scale_kernel(const __grid_constant__ TensorTable<1> t, const float scale, int* nonfinite) {
  const Chunk c = block_chunk(t);
  float* x = t.ptr[0][c.tensor] + c.begin;
  bool ok = true;
  for (int i = threadIdx.x; i < c.n; i += blockDim.x) {
    const float xi = x[i];
    if (Check) ok = ok && is_finite(xi);
    if (Scale) x[i] = __fmul_rn(xi, scale);
  }
  if (Check) {
    const int any_bad = __syncthreads_or(!ok);  // every thread of the block reaches it
    if (any_bad && threadIdx.x == 0) *nonfinite = 1;
  }
}

// ---- host side --------------------------------------------------------------------------------

// The CPU ops' argument checks (cpu::require_like and friends), with the same messages.
void require_like(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  LANCET_CHECK(t.defined(), op << ": " << name << " is an undefined tensor");
  LANCET_CHECK(t.shape() == ref.shape(),
               op << ": " << name << " " << t.shape_str() << " does not match " << ref_name << " " << ref.shape_str());
  require_dtype(op, name, t, DType::f32);
  // Element i of every row must be the same logical element: one memory format for all.
  LANCET_CHECK(t.format() == ref.format(), op << ": " << name << " " << t.shape_str()
                                              << " has another memory format than " << ref_name);
}

float* row_ptr(const Tensor& t) { return static_cast<float*>(t.raw_data()); }

template <typename TensorPtr>
void check_no_null(const char* op, const std::vector<TensorPtr>& ts) {
  for (const Tensor* t : ts) LANCET_CHECK(t != nullptr, op << ": null tensor pointer in the list");
}

void check_list_size(const char* op, const char* name, size_t size, size_t n) {
  LANCET_CHECK(size == n, op << ": " << size << " " << name << " for " << n << " parameters");
}

// sgd_step's checks for one parameter; its table row.
Row<3> sgd_row(const SgdParams& p, Tensor& param, const Tensor& grad, Tensor& buf, const Stream& s) {
  const char* op = "sgd_step";
  require_cuda(op, s, param, {&grad, &buf});
  require_dtype(op, "param", param, DType::f32);
  require_like(op, "grad", grad, param, "param");
  const bool use_momentum = p.momentum != 0.f;
  if (use_momentum) require_like(op, "momentum buffer", buf, param, "param");
  LANCET_CHECK(!p.nesterov || (use_momentum && p.dampening == 0.f),
               op << ": Nesterov momentum requires a momentum and zero dampening");
  return {{row_ptr(param), row_ptr(grad), use_momentum ? row_ptr(buf) : nullptr}, param.numel()};
}

void launch_sgd(const SgdParams& p, bool first_step, const std::vector<Row<3>>& rows, float grad_scale_inv,
                const Stream& s) {
  SgdScalars a{};
  a.lr = p.lr;
  a.momentum = p.momentum;
  a.keep = static_cast<float>(1.0 - static_cast<double>(p.dampening));
  a.weight_decay = p.weight_decay;
  a.grad_scale_inv = grad_scale_inv;
  a.nesterov = p.nesterov;
  a.first_step = first_step;
  a.has_buf = p.momentum != 0.f;
  CudaDeviceGuard guard(s.device.index);
  for_each_table(rows, [&](const TensorTable<3>& t, int blocks) {
    sgd_kernel<<<blocks, kThreads, 0, native(s)>>>(t, a);
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

// adam_step's checks for one parameter; its table row.
Row<4> adam_row(int64_t step, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const Stream& s) {
  const char* op = "adam_step";
  require_cuda(op, s, param, {&grad, &m, &v});
  require_dtype(op, "param", param, DType::f32);
  require_like(op, "grad", grad, param, "param");
  require_like(op, "exp_avg", m, param, "param");
  require_like(op, "exp_avg_sq", v, param, "param");
  LANCET_CHECK(step >= 1, op << ": step counts from 1, got " << step);
  return {{row_ptr(param), row_ptr(grad), row_ptr(m), row_ptr(v)}, param.numel()};
}

void launch_adam(const AdamParams& p, int64_t step, const std::vector<Row<4>>& rows, float grad_scale_inv,
                 const Stream& s) {
  // The scalars exactly as adam_step in optim.cpp computes them (double, then rounded to float).
  const double bc1 = 1.0 - std::pow(static_cast<double>(p.beta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(p.beta2), static_cast<double>(step));
  AdamScalars a{};
  a.step_size = static_cast<float>(p.lr / bc1);
  a.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  a.decay = static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay);
  a.w1 = static_cast<float>(1.0 - static_cast<double>(p.beta1));
  a.w2 = static_cast<float>(1.0 - static_cast<double>(p.beta2));
  a.weight_decay = p.weight_decay;
  a.beta2 = p.beta2;
  a.eps = p.eps;
  a.grad_scale_inv = grad_scale_inv;
  a.decoupled = p.decoupled;
  CudaDeviceGuard guard(s.device.index);
  for_each_table(rows, [&](const TensorTable<4>& t, int blocks) {
    adam_kernel<<<blocks, kThreads, 0, native(s)>>>(t, a);
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

// The defined tensors of a list op's list, checked as checked_list in optim.cpp does.
template <typename TensorPtr>
std::vector<Row<1>> list_rows(const char* op, const std::vector<TensorPtr>& tensors, const Stream& s) {
  std::vector<Row<1>> rows;
  for (const Tensor* t : tensors) {
    LANCET_CHECK(t != nullptr, op << ": null tensor pointer in the list");
    if (!t->defined()) continue;
    require_cuda(op, s, *t);
    require_dtype(op, "tensor", *t, DType::f32);
    rows.push_back({{row_ptr(*t)}, t->numel()});
  }
  return rows;
}

// The finite check, with the unscale when Scale; one flag copied back, one wait for the stream.
template <bool Scale>
bool check_finite(const std::vector<Row<1>>& rows, float scale, const Stream& s) {
  int64_t n = 0;
  for (const auto& r : rows) n += r.numel;
  if (n == 0) return true;  // nothing to look at: no launch, no wait
  CudaDeviceGuard guard(s.device.index);
  Tensor flag = Tensor::empty({1}, DType::i32, s.device);  // kept until the stream has passed it
  int* nonfinite = static_cast<int*>(flag.raw_data());
  LANCET_CUDA_CHECK(cudaMemsetAsync(nonfinite, 0, sizeof(int), native(s)));
  for_each_table(rows, [&](const TensorTable<1>& t, int blocks) {
    check_scale_kernel<true, Scale><<<blocks, kThreads, 0, native(s)>>>(t, scale, nonfinite);
    LANCET_CUDA_LAUNCH_CHECK();
  });
  int host = 0;
  copy_async(&host, Device::cpu(), nonfinite, s.device, sizeof host, s);
  synchronize(s);
  return host == 0;
}

}  // namespace

void sgd_step(const SgdParams& p, bool first_step, Tensor& param, const Tensor& grad, Tensor& momentum_buf,
              const Stream& s) {
  launch_sgd(p, first_step, {sgd_row(p, param, grad, momentum_buf, s)}, 1.0f, s);
}

void adam_step(const AdamParams& p, int64_t step, Tensor& param, const Tensor& grad, Tensor& exp_avg,
               Tensor& exp_avg_sq, const Stream& s) {
  launch_adam(p, step, {adam_row(step, param, grad, exp_avg, exp_avg_sq, s)}, 1.0f, s);
}

void sgd_step_multi(const SgdParams& p, bool first_step, const std::vector<Tensor*>& params,
                    const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& momentum_bufs,
                    const Stream& s, float grad_scale_inv) {
  const char* op = "sgd_step_multi";
  const bool no_bufs = momentum_bufs.empty() && p.momentum == 0.f;  // as in optim.cpp
  check_list_size(op, "grads", grads.size(), params.size());
  if (!no_bufs) check_list_size(op, "momentum buffers", momentum_bufs.size(), params.size());
  check_no_null(op, params);
  check_no_null(op, grads);
  check_no_null(op, momentum_bufs);
  Tensor none;
  std::vector<Row<3>> rows;
  for (size_t i = 0; i < params.size(); ++i)
    rows.push_back(sgd_row(p, *params[i], *grads[i], no_bufs ? none : *momentum_bufs[i], s));
  launch_sgd(p, first_step, rows, grad_scale_inv, s);
}

void adam_step_multi(const AdamParams& p, int64_t step, const std::vector<Tensor*>& params,
                     const std::vector<const Tensor*>& grads, const std::vector<Tensor*>& exp_avgs,
                     const std::vector<Tensor*>& exp_avg_sqs, const Stream& s, float grad_scale_inv) {
  const char* op = "adam_step_multi";
  check_list_size(op, "grads", grads.size(), params.size());
  check_list_size(op, "exp_avgs", exp_avgs.size(), params.size());
  check_list_size(op, "exp_avg_sqs", exp_avg_sqs.size(), params.size());
  check_no_null(op, params);
  check_no_null(op, grads);
  check_no_null(op, exp_avgs);
  check_no_null(op, exp_avg_sqs);
  std::vector<Row<4>> rows;
  for (size_t i = 0; i < params.size(); ++i)
    rows.push_back(adam_row(step, *params[i], *grads[i], *exp_avgs[i], *exp_avg_sqs[i], s));
  launch_adam(p, step, rows, grad_scale_inv, s);
}

namespace {
double squares(const char* op, const std::vector<const Tensor*>& tensors, const Stream& s) {
  const auto rows = list_rows(op, tensors, s);
  int64_t chunks = 0;
  for (const auto& r : rows) chunks += total_chunks(r.numel);
  if (chunks == 0) return 0.0;  // nothing to sum: no launch, no wait
  CudaDeviceGuard guard(s.device.index);
  // chunks partial sums, then the total; kept until the stream has passed them (the wait below).
  // The allocator's blocks are 512-byte aligned, so the doubles are aligned.
  Tensor scratch = Tensor::empty({(chunks + 1) * static_cast<int64_t>(sizeof(double))}, DType::u8, s.device);
  double* partial = static_cast<double*>(scratch.raw_data());
  double* total = partial + chunks;
  for_each_table(rows, [&](const TensorTable<1>& t, int blocks) {
    sum_squares_kernel<<<blocks, kThreads, 0, native(s)>>>(t, partial);
    LANCET_CUDA_LAUNCH_CHECK();
  });
  sum_kernel<<<1, kThreads, 0, native(s)>>>(partial, chunks, total);
  LANCET_CUDA_LAUNCH_CHECK();
  double host = 0;
  copy_async(&host, Device::cpu(), total, s.device, sizeof host, s);
  synchronize(s);
  return host;
}
}  // namespace

double global_l2_norm(const std::vector<const Tensor*>& tensors, const Stream& s) {
  return std::sqrt(squares("global_l2_norm", tensors, s));
}

double sum_of_squares(const std::vector<const Tensor*>& tensors, const Stream& s) {
  return squares("sum_of_squares", tensors, s);
}

bool all_finite(const std::vector<const Tensor*>& tensors, const Stream& s) {
  return check_finite<false>(list_rows("all_finite", tensors, s), 1.0f, s);
}

bool unscale_and_check_finite(const std::vector<Tensor*>& grads, float inv_scale, const Stream& s) {
  return check_finite<true>(list_rows("unscale_and_check_finite", grads, s), inv_scale, s);
}

float clip_grad_norm(const std::vector<Tensor*>& grads, float max_norm, const Stream& s) {
  LANCET_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be positive, got " << max_norm);
  const std::vector<const Tensor*> list(grads.begin(), grads.end());
  const float total = static_cast<float>(cuda::global_l2_norm(list, s));  // qualified: ADL also finds lancet::
  cuda::clip_grads_to_norm(grads, max_norm, total, s);
  return total;
}

void clip_grads_to_norm(const std::vector<Tensor*>& grads, float max_norm, float total_norm, const Stream& s) {
  LANCET_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be positive, got " << max_norm);
  // As optim.cpp (torch): float32 arithmetic on the host, so a NaN norm scales by NaN.
  const float coef = max_norm / (total_norm + 1e-6f);
  if (coef >= 1.f) return;
  const auto rows = list_rows("clip_grad_norm", grads, s);
  CudaDeviceGuard guard(s.device.index);
  for_each_table(rows, [&](const TensorTable<1>& t, int blocks) {
    check_scale_kernel<false, true><<<blocks, kThreads, 0, native(s)>>>(t, coef, nullptr);
    LANCET_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace lancet::cuda
