// linear.cpp — CPU Linear on sgemm. Each product is cut into column blocks by shape only and
// the blocks run as single-threaded sgemm calls on the workers (cpu::BlasSerial), so results
// are bit-identical for any thread count; small products run inline.
#include "kernels/linear.h"

#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#include "kernels/trace.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/linear.h"
#endif

namespace lancet {
namespace {

// Splits `features` columns into at most 8 blocks of at least 16; a product below ~256K
// multiply-adds stays on the calling thread.
struct Blocks {
  int64_t count, size, grain;
};
Blocks blocks_for(int64_t features, int64_t macs) {
  const int64_t count = std::min<int64_t>(8, std::max<int64_t>(1, features / 16));
  return {count, cpu::ceil_div(features, count), macs < (int64_t{1} << 18) ? count : 1};
}

template <typename F>
void run_blocks(const Blocks& b, int64_t features, F&& fn) {
  cpu::BlasSerial serial;
  parallel_for(b.count, b.grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t f0 = t * b.size, f1 = std::min(features, f0 + b.size);
      if (f0 < f1) fn(f0, f1);
    }
  });
}

struct Dims {
  int64_t N, in, out;
};

Dims check(const char* op, const Tensor& x, const Tensor& w, const Stream& s,
           std::initializer_list<const Tensor*> others) {
  cpu::require_cpu(op, s, x, others);
  cpu::require_dtype(op, "input", x, DType::f32);
  cpu::require_defined(op, "weight", w);
  cpu::require_dtype(op, "weight", w, DType::f32);
  LANCET_CHECK(x.ndim() == 2 && w.ndim() == 2 && x.dim(1) == w.dim(1), op << ": input " << x.shape_str()
                                                                          << " does not fit weight " << w.shape_str()
                                                                          << " (need [N, in] and [out, in])");
  return {x.dim(0), x.dim(1), w.dim(0)};
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, const Stream& s) {
  LANCET_CUDA_TWIN(x, linear_forward(x, w, b, y, s));
  const char* op = "linear_forward";
  const Dims d = check(op, x, w, s, {&w, &b, &y});
  cpu::require_shape(op, "output", y, {d.N, d.out}, cpu::desc("input", x) + " and " + cpu::desc("weight", w));
  cpu::require_dtype(op, "output", y, DType::f32);
  if (b.defined()) {
    cpu::require_shape(op, "bias", b, {d.out}, cpu::desc("weight", w));
    cpu::require_dtype(op, "bias", b, DType::f32);
  }
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* bp = b.defined() ? b.data<float>() : nullptr;
  float* yp = y.data<float>();
  add_thread_flops(2 * d.N * d.in * d.out);
  run_blocks(blocks_for(d.out, d.N * d.in * d.out), d.out, [&](int64_t o0, int64_t o1) {
    if (bp) {
      for (int64_t n = 0; n < d.N; ++n) std::copy(bp + o0, bp + o1, yp + n * d.out + o0);
    }
    sgemm(false, true, int(d.N), int(o1 - o0), int(d.in), 1.f, xp, int(d.in), wp + o0 * d.in, int(d.in), bp ? 1.f : 0.f,
          yp + o0, int(d.out));
  });
}

void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw, Tensor& db,
                     const Stream& s) {
  LANCET_CUDA_TWIN(x, linear_backward(x, w, dy, dx, dw, db, s));
  const char* op = "linear_backward";
  const Dims d = check(op, x, w, s, {&w, &dy, &dx, &dw, &db});
  cpu::require_shape(op, "dy", dy, {d.N, d.out}, cpu::desc("input", x) + " and " + cpu::desc("weight", w));
  cpu::require_dtype(op, "dy", dy, DType::f32);
  if (dx.defined()) cpu::require_like(op, "dx", dx, x, "input");
  if (dw.defined()) cpu::require_like(op, "dw", dw, w, "weight");
  if (db.defined()) {
    cpu::require_shape(op, "db", db, {d.out}, cpu::desc("weight", w));
    cpu::require_dtype(op, "db", db, DType::f32);
  }
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* dyp = dy.data<float>();
  if (dx.defined()) {
    float* dxp = dx.data<float>();
    run_blocks(blocks_for(d.in, d.N * d.in * d.out), d.in, [&](int64_t i0, int64_t i1) {
      sgemm(false, false, int(d.N), int(i1 - i0), int(d.out), 1.f, dyp, int(d.out), wp + i0, int(d.in), 0.f, dxp + i0,
            int(d.in));
    });
  }
  if (dw.defined() || db.defined()) {
    float* dwp = dw.defined() ? dw.data<float>() : nullptr;
    float* dbp = db.defined() ? db.data<float>() : nullptr;
    run_blocks(blocks_for(d.out, d.N * d.in * d.out), d.out, [&](int64_t o0, int64_t o1) {
      if (dwp) {
        sgemm(true, false, int(o1 - o0), int(d.in), int(d.N), 1.f, dyp + o0, int(d.out), xp, int(d.in), 1.f,
              dwp + o0 * d.in, int(d.in));
      }
      if (dbp) {
        for (int64_t o = o0; o < o1; ++o) {
          double sum = 0;
          for (int64_t n = 0; n < d.N; ++n) sum += dyp[n * d.out + o];
          dbp[o] += static_cast<float>(sum);
        }
      }
    });
  }
}

}  // namespace lancet
