#include "trainer/metrics.h"

#include <cmath>
#include <limits>

#include "kernels/error.h"

namespace lancet {

ConfusionMatrix::ConfusionMatrix(int num_classes) : k_(num_classes), m_(static_cast<size_t>(num_classes) * num_classes, 0) {
  LANCET_CHECK(num_classes >= 1, "confusion matrix needs at least one class");
}

void ConfusionMatrix::add(int64_t label, int64_t predicted) {
  LANCET_CHECK(label >= 0 && label < k_ && predicted >= 0 && predicted < k_,
               "confusion matrix: label " << label << " / prediction " << predicted << " outside [0, " << k_ << ")");
  ++m_[static_cast<size_t>(label) * k_ + predicted];
  ++total_;
}

double ConfusionMatrix::accuracy() const {
  if (total_ == 0) return std::numeric_limits<double>::quiet_NaN();
  int64_t correct = 0;
  for (int c = 0; c < k_; ++c) correct += at(c, c);
  return static_cast<double>(correct) / total_;
}

double ConfusionMatrix::recall(int c) const {
  int64_t row = 0;
  for (int p = 0; p < k_; ++p) row += at(c, p);
  return row == 0 ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(at(c, c)) / row;
}

double ConfusionMatrix::balanced_accuracy() const {
  double sum = 0;
  int n = 0;
  for (int c = 0; c < k_; ++c) {
    const double r = recall(c);
    if (!std::isnan(r)) { sum += r; ++n; }
  }
  return n == 0 ? std::numeric_limits<double>::quiet_NaN() : sum / n;
}

Json ConfusionMatrix::to_json(const std::vector<std::string>& class_names) const {
  Json j;
  j["accuracy"] = accuracy();
  j["balanced_accuracy"] = balanced_accuracy();
  j["count"] = total_;
  Json recall_by_class = Json::object();
  Json matrix = Json::array();
  for (int c = 0; c < k_; ++c) {
    const std::string name = c < static_cast<int>(class_names.size()) ? class_names[c] : std::to_string(c);
    const double r = recall(c);
    recall_by_class[name] = std::isnan(r) ? Json(nullptr) : Json(r);
    Json row = Json::array();
    for (int p = 0; p < k_; ++p) row.push_back(at(c, p));
    matrix.push_back(row);
  }
  j["recall"] = recall_by_class;
  j["confusion_matrix"] = matrix;
  return j;
}

std::vector<int64_t> argmax_rows(const float* logits, int64_t n, int64_t k) {
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    int64_t best = 0;
    for (int64_t j = 1; j < k; ++j)
      if (logits[i * k + j] > logits[i * k + best]) best = j;
    out[static_cast<size_t>(i)] = best;
  }
  return out;
}

}  // namespace lancet
