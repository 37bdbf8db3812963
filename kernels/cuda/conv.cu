// cuda/conv.cu — the conv2d twins on cuDNN (legacy convolution API, cuDNN 9).
//
// x's memory format is the convolution's layout: y, dy, dx must share it. A weight (and dw) in
// the other format is converted into a scratch copy (weights are small next to activations).
// Bias add and bias gradient are lancet kernels (conv_util.h), the rest is cuDNN:
//   forward          y  = conv(x, w)             (beta 0), then y += b
//   backward data    dx = conv_transpose(dy, w)  (beta 0: overwritten)
//   backward filter  dw += conv_grad(x, dy)      (beta 1: accumulated), db += sum dy
// Mixed precision: x, w, dy in f16/bf16 with an f32 dw — cuDNN computes the 16-bit gradient into
// scratch (beta 0) and a lancet kernel adds it to dw (conv_util.h: accumulate_into_f32).
// Algorithms come from choose_conv_algo (conv_algo.h). All work is enqueued on s; nothing
// syncs with the host except an autotune search, once per shape.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/conv.h"
#include "kernels/cuda/conv_algo.h"
#include "kernels/cuda/conv_util.h"
#include "kernels/trace.h"

namespace lancet::cuda {
namespace {

void require_format(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  LANCET_CHECK(t.format() == x.format(), op << ": " << name << " " << t.shape_str() << " is " << memory_format_name(t.format())
                                            << " but the input " << x.shape_str() << " is "
                                            << memory_format_name(x.format()));
}

// `t` with x's shape, dtype and memory format (dx).
void require_like_input(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  require_defined(op, name, t);
  LANCET_CHECK(t.shape() == x.shape(),
               op << ": " << name << " " << t.shape_str() << " does not match input " << x.shape_str());
  require_dtype(op, name, t, x.dtype());
  require_format(op, name, t, x);
}

// The checks both twins share; returns the output shape.
Shape check_common(const char* op, const Conv2dParams& p, const Tensor& x, const Tensor& w) {
  require_defined(op, "weight", w);
  cudnn_dtype(x.dtype(), op);  // f32, f16 or bf16, else throws naming op
  LANCET_CHECK(x.ndim() == 4, op << ": input " << x.shape_str() << " must be 4-D");
  require_dtype(op, "weight", w, x.dtype());
  return conv2d_output_shape(p, x.shape(), w.shape());
}

// w in memory format f: w itself, or a converted copy (enqueued on s).
Tensor in_format(const Tensor& w, MemoryFormat f, const Stream& s) {
  if (w.format() == f) return w;
  Tensor t = Tensor::empty(w.shape(), w.dtype(), w.device(), f);
  convert_format(w, t, /*accumulate=*/false, s);
  return t;
}

void* data_or_null(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }

// 2 FLOPs per multiply-add, as the CPU twin counts (kernels/trace.h).
int64_t conv_flops(const Shape& ys, const Tensor& w) { return 2 * shape_numel(ys) * w.dim(1) * w.dim(2) * w.dim(3); }

}  // namespace

void conv2d_forward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y,
                    const Stream& s) {
  const char* op = "conv2d_forward";
  require_cuda(op, s, x, {&w, &b, &y});
  const Shape ys = check_common(op, p, x, w);
  require_shape(op, "output", y, ys, desc("input", x) + " and " + desc("weight", w));
  require_dtype(op, "output", y, x.dtype());
  require_format(op, "output", y, x);
  if (b.defined()) {
    require_shape(op, "bias", b, {w.dim(0)}, desc("weight", w));
    require_dtype(op, "bias", b, DType::f32);
  }
  if (y.numel() == 0) return;
  CudaDeviceGuard guard(s.device.index);
  if (x.numel() == 0) {  // no input channels: an empty sum, y = b (cuDNN rejects a zero-size descriptor)
    LANCET_CUDA_CHECK(cudaMemsetAsync(y.raw_data(), 0, y.nbytes(), native(s)));
    if (b.defined()) add_channel_bias(y, b, s);
    return;
  }
  add_thread_flops(conv_flops(ys, w));
  cudnnHandle_t h = cudnn_handle(s);
  const Tensor wc = in_format(w, x.format(), s);
  const TensorDesc xd(x, op), yd(y, op);
  const FilterDesc wd(wc, op);
  ConvDesc cd(p, op);
  const ConvAlgo a = choose_conv_algo({ConvDirection::forward, p, x, wc, y, y, xd, wd, yd, cd, h, s, op});
  Tensor ws = workspace(s, a.workspace_bytes);
  const float one = 1.f, zero = 0.f;
  LANCET_CUDNN_CHECK(cudnnConvolutionForward(h, &one, xd.get(), x.raw_data(), wd.get(), wc.raw_data(), cd.get(),
                                             static_cast<cudnnConvolutionFwdAlgo_t>(a.algo), data_or_null(ws),
                                             a.workspace_bytes, &zero, yd.get(), y.raw_data()));
  if (b.defined()) add_channel_bias(y, b, s);
}

void conv2d_backward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw,
                     Tensor& db, const Stream& s) {
  const char* op = "conv2d_backward";
  require_cuda(op, s, x, {&w, &dy, &dx, &dw, &db});
  const Shape ys = check_common(op, p, x, w);
  require_shape(op, "dy", dy, ys, desc("input", x) + " and " + desc("weight", w));
  require_dtype(op, "dy", dy, x.dtype());
  require_format(op, "dy", dy, x);
  if (dx.defined()) require_like_input(op, "dx", dx, x);
  if (dw.defined()) {
    LANCET_CHECK(dw.shape() == w.shape(),
                 op << ": dw " << dw.shape_str() << " does not match weight " << w.shape_str());
    // Mixed precision: an f32 dw (the FP32 master's gradient) with f16/bf16 operands.
    if (dw.dtype() != DType::f32) require_dtype(op, "dw", dw, x.dtype());
  }
  if (db.defined()) {
    require_shape(op, "db", db, {w.dim(0)}, desc("weight", w));
    require_dtype(op, "db", db, DType::f32);
  }
  CudaDeviceGuard guard(s.device.index);
  if (x.numel() == 0) {  // no input channels (or no batch): dw and dx are empty, db still gets sum dy
    if (db.defined() && dy.numel() > 0) accumulate_channel_sum(dy, db, s);
    return;
  }
  if (dy.numel() == 0) {  // no output channels: dx is zero, dw and db get nothing
    if (dx.defined()) LANCET_CUDA_CHECK(cudaMemsetAsync(dx.raw_data(), 0, dx.nbytes(), native(s)));
    return;
  }
  if (!dx.defined() && !dw.defined() && !db.defined()) return;
  const float one = 1.f, zero = 0.f;
  if (dx.defined() || dw.defined()) {
    cudnnHandle_t h = cudnn_handle(s);
    const Tensor wc = in_format(w, x.format(), s);
    const TensorDesc xd(x, op), dyd(dy, op);
    const FilterDesc wd(wc, op);
    ConvDesc cd(p, op);
    if (dx.defined()) {
      const ConvAlgo a = choose_conv_algo({ConvDirection::backward_data, p, x, wc, dy, dx, xd, wd, dyd, cd, h, s, op});
      Tensor ws = workspace(s, a.workspace_bytes);
      LANCET_CUDNN_CHECK(cudnnConvolutionBackwardData(h, &one, wd.get(), wc.raw_data(), dyd.get(), dy.raw_data(),
                                                      cd.get(), static_cast<cudnnConvolutionBwdDataAlgo_t>(a.algo),
                                                      data_or_null(ws), a.workspace_bytes, &zero, xd.get(),
                                                      dx.raw_data()));
    }
    if (dw.defined()) {
      // dw in the convolution's format and dtype accumulates in place (beta 1); otherwise the
      // gradient goes to scratch (beta 0) and is added to dw while converting back. cuDNN's
      // legacy API wants x, dy and dw in one data type, so an f32 dw of an f16/bf16
      // convolution takes the scratch path: the 16-bit gradient is added to the FP32 one.
      const bool direct = dw.format() == x.format() && dw.dtype() == x.dtype();
      Tensor dwc = direct ? dw : Tensor::empty(w.shape(), w.dtype(), w.device(), x.format());
      const ConvAlgo a =
          choose_conv_algo({ConvDirection::backward_filter, p, x, wc, dy, Tensor(), xd, wd, dyd, cd, h, s, op});
      Tensor ws = workspace(s, a.workspace_bytes);
      LANCET_CUDNN_CHECK(cudnnConvolutionBackwardFilter(h, &one, xd.get(), x.raw_data(), dyd.get(), dy.raw_data(),
                                                        cd.get(), static_cast<cudnnConvolutionBwdFilterAlgo_t>(a.algo),
                                                        data_or_null(ws), a.workspace_bytes, direct ? &one : &zero,
                                                        wd.get(), dwc.raw_data()));
      if (!direct) {
        if (dw.dtype() == dwc.dtype())
          convert_format(dwc, dw, /*accumulate=*/true, s);
        else
          accumulate_into_f32(dwc, dw, s);
      }
    }
  }
  if (db.defined()) accumulate_channel_sum(dy, db, s);
}

}  // namespace lancet::cuda
