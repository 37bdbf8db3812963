// cuda/conv_algo.cu — cuDNN descriptors and the per-shape algorithm cache (see conv_algo.h).
#include <array>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/conv.h"
#include "kernels/cuda/conv_algo.h"

namespace lancet::cuda {
namespace {

// direction, device, dtype, format, autotune, tf32; x and w shapes; the seven Conv2dParams.
using Key = std::array<int64_t, 21>;

std::mutex g_cache_mutex;
std::map<Key, ConvAlgo>& cache() {
  static std::map<Key, ConvAlgo> m;
  return m;
}

Key make_key(const ConvCall& c, bool autotune, bool tf32) {
  const Shape& x = c.x.shape();
  const Shape& w = c.w.shape();
  const Conv2dParams& p = c.p;
  return {static_cast<int64_t>(c.dir), c.s.device.index, static_cast<int64_t>(c.x.dtype()),
          static_cast<int64_t>(c.x.format()), autotune, tf32, x[0], x[1], x[2], x[3], w[0], w[1], w[2], w[3],
          p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dilation_h, p.dilation_w, p.groups};
}

const char* direction_name(ConvDirection d) {
  switch (d) {
    case ConvDirection::forward: return "forward";
    case ConvDirection::backward_data: return "backward data";
    default: return "backward filter";
  }
}

// The cuDNN calls of one direction, so that search() is written once. ConvCall's xd doubles as
// dx's descriptor and yd as dy's (same shapes, dtype and format).
struct Forward {
  using Perf = cudnnConvolutionFwdAlgoPerf_t;
  static cudnnStatus_t max_count(const ConvCall& c, int* n) {
    return cudnnGetConvolutionForwardAlgorithmMaxCount(c.handle, n);
  }
  static cudnnStatus_t heuristics(const ConvCall& c, int req, int* n, Perf* perf) {
    return cudnnGetConvolutionForwardAlgorithm_v7(c.handle, c.xd.get(), c.wd.get(), c.cd.get(), c.yd.get(), req, n,
                                                  perf);
  }
  static cudnnStatus_t find(const ConvCall& c, void* out, int req, int* n, Perf* perf, void* ws, size_t bytes) {
    return cudnnFindConvolutionForwardAlgorithmEx(c.handle, c.xd.get(), c.x.raw_data(), c.wd.get(), c.w.raw_data(),
                                                  c.cd.get(), c.yd.get(), out, req, n, perf, ws, bytes);
  }
  static cudnnStatus_t workspace(const ConvCall& c, int algo, size_t* bytes) {
    return cudnnGetConvolutionForwardWorkspaceSize(c.handle, c.xd.get(), c.wd.get(), c.cd.get(), c.yd.get(),
                                                   static_cast<cudnnConvolutionFwdAlgo_t>(algo), bytes);
  }
};

struct BackwardData {
  using Perf = cudnnConvolutionBwdDataAlgoPerf_t;
  static cudnnStatus_t max_count(const ConvCall& c, int* n) {
    return cudnnGetConvolutionBackwardDataAlgorithmMaxCount(c.handle, n);
  }
  static cudnnStatus_t heuristics(const ConvCall& c, int req, int* n, Perf* perf) {
    return cudnnGetConvolutionBackwardDataAlgorithm_v7(c.handle, c.wd.get(), c.yd.get(), c.cd.get(), c.xd.get(), req,
                                                       n, perf);
  }
  static cudnnStatus_t find(const ConvCall& c, void* out, int req, int* n, Perf* perf, void* ws, size_t bytes) {
    return cudnnFindConvolutionBackwardDataAlgorithmEx(c.handle, c.wd.get(), c.w.raw_data(), c.yd.get(),
                                                       c.y.raw_data(), c.cd.get(), c.xd.get(), out, req, n, perf, ws,
                                                       bytes);
  }
  static cudnnStatus_t workspace(const ConvCall& c, int algo, size_t* bytes) {
    return cudnnGetConvolutionBackwardDataWorkspaceSize(c.handle, c.wd.get(), c.yd.get(), c.cd.get(), c.xd.get(),
                                                        static_cast<cudnnConvolutionBwdDataAlgo_t>(algo), bytes);
  }
};

struct BackwardFilter {
  using Perf = cudnnConvolutionBwdFilterAlgoPerf_t;
  static cudnnStatus_t max_count(const ConvCall& c, int* n) {
    return cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(c.handle, n);
  }
  static cudnnStatus_t heuristics(const ConvCall& c, int req, int* n, Perf* perf) {
    return cudnnGetConvolutionBackwardFilterAlgorithm_v7(c.handle, c.xd.get(), c.yd.get(), c.cd.get(), c.wd.get(),
                                                         req, n, perf);
  }
  static cudnnStatus_t find(const ConvCall& c, void* out, int req, int* n, Perf* perf, void* ws, size_t bytes) {
    return cudnnFindConvolutionBackwardFilterAlgorithmEx(c.handle, c.xd.get(), c.x.raw_data(), c.yd.get(),
                                                         c.y.raw_data(), c.cd.get(), c.wd.get(), out, req, n, perf,
                                                         ws, bytes);
  }
  static cudnnStatus_t workspace(const ConvCall& c, int algo, size_t* bytes) {
    return cudnnGetConvolutionBackwardFilterWorkspaceSize(c.handle, c.xd.get(), c.yd.get(), c.cd.get(), c.wd.get(),
                                                          static_cast<cudnnConvolutionBwdFilterAlgo_t>(algo), bytes);
  }
};

cudnnMathType_t requested_math(DType dt, bool tf32) {
  if (dt != DType::f32) return CUDNN_TENSOR_OP_MATH;
  return tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
}

[[noreturn]] void fail_no_algo(const ConvCall& c, const std::string& why) {
  const Conv2dParams& p = c.p;
  LANCET_FAIL(c.op << ": no cuDNN " << direction_name(c.dir) << " algorithm for input " << c.x.shape_str() << " "
                   << dtype_name(c.x.dtype())
                   << " " << memory_format_name(c.x.format()) << " and weight "
                   << c.w.shape_str() << " (stride " << p.stride_h << "x" << p.stride_w << ", padding " << p.pad_h
                   << "x" << p.pad_w << ", dilation " << p.dilation_h << "x" << p.dilation_w << ", groups "
                   << p.groups << "): " << why);
}

// The first of cuDNN's ranked candidates that succeeded, may run with the math we allow, and
// fits the workspace limit. Strict f32 runs every candidate with FMA math: a candidate that
// cuDNN ranked for tensor-op math is skipped, one that reports the default math is re-queried
// under FMA math (its workspace query fails when it cannot run so).
template <typename D>
ConvAlgo pick(const ConvCall& c, const std::vector<typename D::Perf>& perf, int n, bool tf32) {
  const bool strict_f32 = c.x.dtype() == DType::f32 && !tf32;
  for (int i = 0; i < n; ++i) {
    const typename D::Perf& q = perf[static_cast<size_t>(i)];
    if (q.status != CUDNN_STATUS_SUCCESS) continue;
    cudnnMathType_t math = q.mathType;
    // ALLOW_CONVERSION lets cuDNN down-convert the operands to f16 (range 65504, 10-bit
    // mantissa): never what an f32 or bf16 convolution asked for.
    if (math == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION && c.x.dtype() != DType::f16) continue;
    if (strict_f32) {
      if (math != CUDNN_FMA_MATH && math != CUDNN_DEFAULT_MATH) continue;
      math = CUDNN_FMA_MATH;
    }
    c.cd.set_math(math);
    size_t bytes = 0;
    if (D::workspace(c, static_cast<int>(q.algo), &bytes) != CUDNN_STATUS_SUCCESS || bytes > kMaxConvWorkspace)
      continue;
    return {static_cast<int>(q.algo), math, bytes};
  }
  fail_no_algo(c, std::to_string(n) + " candidates, none usable within " +
                      std::to_string(kMaxConvWorkspace >> 20) + " MiB of workspace" +
                      (strict_f32 ? " with FMA math" : ""));
}

// As much of kMaxConvWorkspace as the device can give now (quartering down to 1 MiB, else
// none) for Find, which then reports candidates needing more as failed.
Tensor find_workspace(const Stream& s, size_t* bytes) {
  for (size_t b = kMaxConvWorkspace; b >= (size_t{1} << 20); b /= 4) {
    try {
      Tensor t = workspace(s, b);
      *bytes = b;
      return t;
    } catch (const Error&) {
      // out of device memory: try a smaller workspace
    }
  }
  *bytes = 0;
  return Tensor();
}

template <typename D>
ConvAlgo search(const ConvCall& c, bool autotune, bool tf32) {
  c.cd.set_math(requested_math(c.x.dtype(), tf32));
  int max = 0;
  LANCET_CUDNN_CHECK(D::max_count(c, &max));
  std::vector<typename D::Perf> perf(static_cast<size_t>(std::max(max, 1)));
  int n = 0;
  if (autotune) {
    // Find runs every candidate on real buffers (and synchronises); its output goes to the
    // direction's overwritten output, or for backward filter to scratch so dw keeps its sum.
    size_t bytes = 0;
    Tensor ws = find_workspace(c.s, &bytes);
    Tensor out = c.dir == ConvDirection::backward_filter
                     ? Tensor::empty(c.w.shape(), c.w.dtype(), c.w.device(), c.w.format())
                     : c.out;
    const cudnnStatus_t st = D::find(c, out.raw_data(), static_cast<int>(perf.size()), &n, perf.data(),
                                     ws.defined() ? ws.raw_data() : nullptr, bytes);
    // An unsupported configuration fails here: say which convolution, in one line.
    if (st != CUDNN_STATUS_SUCCESS)
      fail_no_algo(c, std::string("cudnnFind*AlgorithmEx failed: ") + cudnnGetErrorString(st));
  } else {
    const cudnnStatus_t st = D::heuristics(c, static_cast<int>(perf.size()), &n, perf.data());
    if (st != CUDNN_STATUS_SUCCESS)
      fail_no_algo(c, std::string("cudnnGet*Algorithm_v7 failed: ") + cudnnGetErrorString(st));
  }
  n = std::min(n, static_cast<int>(perf.size()));
  return pick<D>(c, perf, n, tf32);
}

// cuDNN's output shape for the descriptors must be ours (conv2d_output_shape): checked once per
// key, so a disagreement fails loudly instead of writing out of bounds.
void check_output_dims(const ConvCall& c) {
  int n = 0, ch = 0, h = 0, w = 0;
  LANCET_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(c.cd.get(), c.xd.get(), c.wd.get(), &n, &ch, &h, &w));
  const Shape cudnn_shape{n, ch, h, w};
  LANCET_CHECK(cudnn_shape == c.y.shape(), c.op << ": cuDNN computes output " << shape_str(cudnn_shape)
                                                << " for input " << c.x.shape_str() << " and weight "
                                                << c.w.shape_str() << ", lancet " << c.y.shape_str());
}

}  // namespace

FilterDesc::FilterDesc(const Tensor& w, const char* op) {
  LANCET_CHECK(w.ndim() == 4, op << ": weight " << w.shape_str() << " must be 4-D");
  LANCET_CUDNN_CHECK(cudnnCreateFilterDescriptor(&d_));
  const cudnnStatus_t st = cudnnSetFilter4dDescriptor(
      d_, cudnn_dtype(w.dtype(), op), w.format() == MemoryFormat::channels_last ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW,
      static_cast<int>(w.dim(0)), static_cast<int>(w.dim(1)), static_cast<int>(w.dim(2)), static_cast<int>(w.dim(3)));
  if (st != CUDNN_STATUS_SUCCESS) {
    cudnnDestroyFilterDescriptor(d_);
    LANCET_FAIL(op << ": cudnnSetFilter4dDescriptor for weight " << w.shape_str()
                   << " failed: " << cudnnGetErrorString(st));
  }
}

FilterDesc::~FilterDesc() { cudnnDestroyFilterDescriptor(d_); }

ConvDesc::ConvDesc(const Conv2dParams& p, const char* op) {
  LANCET_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&d_));
  cudnnStatus_t st = cudnnSetConvolution2dDescriptor(d_, p.pad_h, p.pad_w, p.stride_h, p.stride_w, p.dilation_h,
                                                     p.dilation_w, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT);
  if (st == CUDNN_STATUS_SUCCESS) st = cudnnSetConvolutionGroupCount(d_, p.groups);
  if (st != CUDNN_STATUS_SUCCESS) {
    cudnnDestroyConvolutionDescriptor(d_);
    LANCET_FAIL(op << ": cuDNN convolution descriptor (stride " << p.stride_h << "x" << p.stride_w << ", padding "
                   << p.pad_h << "x" << p.pad_w << ", dilation " << p.dilation_h << "x" << p.dilation_w
                   << ", groups " << p.groups << ") failed: " << cudnnGetErrorString(st));
  }
}

ConvDesc::~ConvDesc() { cudnnDestroyConvolutionDescriptor(d_); }

void ConvDesc::set_math(cudnnMathType_t m) { LANCET_CUDNN_CHECK(cudnnSetConvolutionMathType(d_, m)); }

ConvAlgo choose_conv_algo(const ConvCall& c) {
  const bool autotune = conv_autotune(), tf32 = allow_tf32();
  const Key key = make_key(c, autotune, tf32);
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    const auto it = cache().find(key);
    if (it != cache().end()) {
      c.cd.set_math(it->second.math);
      return it->second;
    }
  }
  check_output_dims(c);
  ConvAlgo a{};
  switch (c.dir) {
    case ConvDirection::forward: a = search<Forward>(c, autotune, tf32); break;
    case ConvDirection::backward_data: a = search<BackwardData>(c, autotune, tf32); break;
    case ConvDirection::backward_filter: a = search<BackwardFilter>(c, autotune, tf32); break;
  }
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    a = cache().emplace(key, a).first->second;  // another thread's choice for the key, if first
  }
  c.cd.set_math(a.math);
  return a;
}

size_t conv_algo_cache_size() {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  return cache().size();
}

void clear_conv_algo_cache() {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  cache().clear();
}

}  // namespace lancet::cuda
