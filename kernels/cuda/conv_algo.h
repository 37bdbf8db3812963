// cuda/conv_algo.h — cuDNN convolution descriptors (RAII) and the algorithm choice behind the
// conv2d twins (internal to kernels/cuda/conv*.cu).
//
// A choice is made once per key — input and weight shapes, Conv2dParams, dtype, memory format,
// device, direction, and the autotune / TF32 settings — and cached for the process (a mutex
// guards the map; two threads missing the same key both search and the first result stays):
//   * heuristics (default): cuDNN's *_v7 ranking; the first algorithm that reports success, uses
//     an allowed math type, and needs at most kMaxConvWorkspace bytes of workspace;
//   * autotune (set_conv_autotune): cudnnFind*AlgorithmEx times the candidates on the call's
//     buffers with up to kMaxConvWorkspace of workspace (synchronising the device, once per
//     key); the fastest that passes the same filters wins.
// Math types: f16/bf16 ask for tensor-op math; f32 asks for FMA math (no TF32) unless
// allow_tf32(), when the default math lets cuDNN use TF32. A candidate's own math type is
// what the convolution then runs with (cuDNN ties algorithm and math type together).
#pragma once
#include <cstddef>

#include "kernels/conv.h"
#include "kernels/cuda/libraries.h"

namespace lancet::cuda {

constexpr size_t kMaxConvWorkspace = size_t{512} << 20;

// A filter descriptor for w [Cout, Cin/groups, KH, KW] laid out in `format` (NCHW = KCRS,
// channels_last = KRSC), which must be w's own format.
class FilterDesc {
 public:
  FilterDesc(const Tensor& w, const char* op);
  ~FilterDesc();
  FilterDesc(const FilterDesc&) = delete;
  FilterDesc& operator=(const FilterDesc&) = delete;
  cudnnFilterDescriptor_t get() const { return d_; }

 private:
  cudnnFilterDescriptor_t d_ = nullptr;
};

// Cross-correlation (PyTorch's Conv2d) with p's padding, stride, dilation and groups, computed
// in f32 for every data type.
class ConvDesc {
 public:
  ConvDesc(const Conv2dParams& p, const char* op);
  ~ConvDesc();
  ConvDesc(const ConvDesc&) = delete;
  ConvDesc& operator=(const ConvDesc&) = delete;
  void set_math(cudnnMathType_t m);
  cudnnConvolutionDescriptor_t get() const { return d_; }

 private:
  cudnnConvolutionDescriptor_t d_ = nullptr;
};

enum class ConvDirection { forward, backward_data, backward_filter };

struct ConvAlgo {
  int algo;  // a cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t by direction
  cudnnMathType_t math;
  size_t workspace_bytes;
};

// One convolution call as the chooser sees it. x is the input, w the weight in x's memory
// format, y the output (forward) or dy (backward); `out` is the direction's output buffer that
// autotune may scribble on: y for forward, dx for backward data (both overwritten by the op
// afterwards anyway); backward filter benchmarks into a scratch tensor, never into dw.
struct ConvCall {
  ConvDirection dir;
  const Conv2dParams& p;
  const Tensor& x;
  const Tensor& w;
  const Tensor& y;
  const Tensor& out;
  const TensorDesc& xd;
  const FilterDesc& wd;
  const TensorDesc& yd;
  ConvDesc& cd;
  cudnnHandle_t handle;
  const Stream& s;
  const char* op;
};

// The cached or newly chosen algorithm; leaves c.cd set to the algorithm's math type.
ConvAlgo choose_conv_algo(const ConvCall& c);

}  // namespace lancet::cuda
