// Shared by tests/test_gradsync.cpp (CPU, mpirun) and tests/test_gpu_gradsync_timing.cpp (GPU):
// the small MedicalCNN config the GradSync tests train, and seeded random tensors.
#pragma once
#include <cstdint>
#include <random>

#include "kernels/tensor.h"
#include "trainer/config.h"

namespace lancet::testing {

inline Json small_gradsync_model() {
  return Json::parse(R"({"name": "medicalcnn", "in_channels": 1, "num_classes": 3, "widths": [8, 16, 16, 16],
                         "depths": [1, 1, 1, 1], "head_hidden": 16, "dropout": [0.0, 0.0]})");
}

// Normal(0, 1) values from `seed`, on the CPU.
inline Tensor random_tensor(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = nd(rng);
  return t;
}

}  // namespace lancet::testing
