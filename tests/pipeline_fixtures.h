// Shared by tests/test_pipeline.cpp (CPU stages) and tests/test_gpu_pipeline.cpp (GPU stages):
// optimizer settings by name, and a random step's micro-batches cut as lancet train cuts them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "trainer/config.h"

namespace lancet::testing {

// The optimizer settings of the config's defaults, with this name and learning rate.
inline OptimConfig optim(const std::string& name, float lr) {
  Json c = default_config();
  c["optim"]["name"] = name;
  c["optim"]["lr"] = lr;
  return optim_config(c);
}

struct MicroBatches {
  std::vector<Tensor> xs, ys;
};
// `rows` random 1-channel images (size x size) with labels in [0, 3), in micro-batches of
// ceil(rows / m) rows as lancet train splits a step, on `device`.
inline MicroBatches make_batch(int64_t rows, int m, int size, uint32_t seed, Device device = Device::cpu()) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  MicroBatches b;
  const int64_t mb = (rows + m - 1) / m;
  for (int64_t r0 = 0; r0 < rows; r0 += mb) {
    const int64_t n = std::min(mb, rows - r0);
    Tensor x = Tensor::empty({n, 1, size, size});
    Tensor y = Tensor::empty({n}, DType::i64);
    for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = nd(rng);
    for (int64_t i = 0; i < n; ++i) y.data<int64_t>()[i] = static_cast<int64_t>(rng() % 3);
    b.xs.push_back(x.to(device));
    b.ys.push_back(y.to(device));
  }
  return b;
}

}  // namespace lancet::testing
