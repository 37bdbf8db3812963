// tiny_medicalcnn.h — a MedicalCNN small enough for whole-model gradient checks and CPU-vs-GPU
// comparisons: one block per stage, SE reduction 4, the rest (context width, dropout) as the
// defaults. Each test picks its own channels and widths (the GPU tests want widths that are not
// multiples of 8).
#pragma once
#include <vector>

#include "layers/medicalcnn.h"

namespace lancet::testing {

inline MedicalCNNConfig tiny_medicalcnn_config(int in_channels, int num_classes, std::vector<int> widths,
                                               int head_hidden) {
  MedicalCNNConfig c;
  c.in_channels = in_channels;
  c.num_classes = num_classes;
  c.widths = std::move(widths);
  c.depths = {1, 1, 1, 1};
  c.se_reduction = 4;
  c.head_hidden = head_hidden;
  return c;
}

}  // namespace lancet::testing
