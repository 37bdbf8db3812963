// metrics.h — classification metrics accumulated over an evaluation pass.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/config.h"

namespace lancet {

class ConfusionMatrix {
 public:
  explicit ConfusionMatrix(int num_classes);
  void add(int64_t label, int64_t predicted);
  int num_classes() const { return k_; }
  int64_t total() const { return total_; }
  int64_t at(int label, int predicted) const { return m_[static_cast<size_t>(label) * k_ + predicted]; }
  double accuracy() const;
  double recall(int c) const;  // sensitivity of class c; NaN when the class never occurs
  double balanced_accuracy() const;  // mean recall over classes present
  Json to_json(const std::vector<std::string>& class_names) const;

 private:
  int k_;
  int64_t total_ = 0;
  std::vector<int64_t> m_;
};

// Index of the largest logit in each row of a [N, K] CPU f32 buffer.
std::vector<int64_t> argmax_rows(const float* logits, int64_t n, int64_t k);

}  // namespace lancet
