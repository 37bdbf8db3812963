// metrics.h — classification metrics: the confusion matrix the training loop accumulates, and
// the clinical report `lancet eval` prints (per-class precision / sensitivity / specificity /
// F1, averages, AUROC, an operating point at a target sensitivity).
//
// The report follows scikit-learn's definitions so that its numbers can be checked against it
// (tests/reference/make_metric_fixtures.py): zero_division=0 (a ratio with a zero denominator
// is 0), macro averages over all classes, weighted averages by support, AUROC as the trapezoid
// over distinct score thresholds (tied scores form one ROC point).
#pragma once
#include <cstdint>
#include <optional>
#include <ostream>
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

// Area under the ROC curve of `scores` against `positive` (same length), as sklearn's
// roc_auc_score: NaN when either class is missing.
double roc_auc(const std::vector<double>& scores, const std::vector<bool>& positive);

struct ReportOptions {
  // Binary tasks only: predict class 1 when P(class 1) >= threshold (unset: 0.5). Multi-class
  // tasks predict the argmax; setting either field for them is an error.
  std::optional<double> threshold;
  // Binary tasks only: also report the operating point reaching this sensitivity, in (0, 1].
  std::optional<double> target_sensitivity;
};

struct ClassMetrics {
  double precision = 0, recall = 0, specificity = 0, f1 = 0;  // recall = sensitivity
  int64_t support = 0;    // samples whose label is the class
  int64_t predicted = 0;  // samples predicted as the class
};

// The largest threshold on P(class 1) whose sensitivity is at least the target, as read off
// sklearn's roc_curve(drop_intermediate=False), and the sensitivity / specificity there.
struct OperatingPoint {
  double target_sensitivity = 0, threshold = 0, sensitivity = 0, specificity = 0;
};

struct ClassificationReport {
  int num_classes = 0;
  int64_t count = 0;
  std::vector<std::string> class_names;
  bool binary = false;
  double threshold = 0.5;              // binary decision threshold on P(class 1); unused otherwise
  std::vector<int64_t> labels, predicted;  // per sample, dataset order
  ConfusionMatrix cm{1};               // rows: label, columns: prediction
  double accuracy = 0, balanced_accuracy = 0;  // balanced: mean recall over classes present
  std::vector<ClassMetrics> per_class;
  ClassMetrics macro, weighted;        // support = count, predicted = count
  // AUROC. Binary: `auroc` on P(class 1). Multi-class: one-vs-rest per class (NaN for a class
  // without both positives and negatives, listed in auroc_skipped), `auroc` = their macro mean,
  // and `auroc_micro` over the flattened one-hot labels (sklearn average='micro').
  double auroc = 0, auroc_micro = 0;
  std::vector<double> auroc_per_class;
  std::vector<int> auroc_skipped;
  std::optional<OperatingPoint> operating_point;

  Json to_json() const;
  std::string to_text() const;
};

// probs: [n * k] row-major class probabilities (softmax output); labels: [n] in [0, k).
// class_names: k names, or empty for "0", "1", ...
ClassificationReport classification_report(const std::vector<float>& probs, const std::vector<int64_t>& labels,
                                           int num_classes, const std::vector<std::string>& class_names,
                                           const ReportOptions& options = {});

// One CSV row per sample: index,label,predicted,prob_<class>... (labels as class indices); with
// `sources` (one per sample: where it came from, e.g. its file), index,source,label,...
void write_predictions_csv(std::ostream& os, const ClassificationReport& report, const std::vector<float>& probs,
                           const std::vector<std::string>& sources = {});

}  // namespace lancet
