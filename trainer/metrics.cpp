#include "trainer/metrics.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <limits>
#include <numeric>
#include <sstream>

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

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

double ratio(int64_t num, int64_t den) { return den == 0 ? 0.0 : static_cast<double>(num) / den; }  // zero_division=0

// ROC points at each distinct score, highest first: true / false positives among the samples
// scoring >= that threshold (sklearn's roc_curve with drop_intermediate=False, without its
// leading (inf, 0, 0) point).
struct RocPoints {
  std::vector<double> thresholds;
  std::vector<int64_t> tps, fps;
};

RocPoints roc_points(const std::vector<double>& scores, const std::vector<bool>& positive) {
  std::vector<size_t> order(scores.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return scores[a] > scores[b]; });
  RocPoints r;
  int64_t tp = 0, fp = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    (positive[order[i]] ? tp : fp) += 1;
    if (i + 1 == order.size() || scores[order[i + 1]] != scores[order[i]]) {
      r.thresholds.push_back(scores[order[i]]);
      r.tps.push_back(tp);
      r.fps.push_back(fp);
    }
  }
  return r;
}

std::string name_of(const std::vector<std::string>& names, int c) {
  return c < static_cast<int>(names.size()) ? names[static_cast<size_t>(c)] : std::to_string(c);
}

Json number(double v) { return std::isnan(v) ? Json(nullptr) : Json(v); }

Json class_json(const ClassMetrics& m) {
  return Json{{"precision", m.precision}, {"recall", m.recall},       {"sensitivity", m.recall},
              {"specificity", m.specificity}, {"f1", m.f1},         {"support", m.support},
              {"predicted", m.predicted}};
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return q + "\"";
}

}  // namespace

double roc_auc(const std::vector<double>& scores, const std::vector<bool>& positive) {
  LANCET_CHECK(scores.size() == positive.size(),
               "roc_auc: " << scores.size() << " scores but " << positive.size() << " labels");
  const RocPoints r = roc_points(scores, positive);
  if (r.tps.empty() || r.tps.back() == 0 || r.fps.back() == 0) return kNaN;
  const double p = static_cast<double>(r.tps.back()), n = static_cast<double>(r.fps.back());
  double area = 0, x0 = 0, y0 = 0;
  for (size_t i = 0; i < r.tps.size(); ++i) {
    const double x = r.fps[i] / n, y = r.tps[i] / p;
    area += (x - x0) * (y + y0) / 2;
    x0 = x;
    y0 = y;
  }
  return area;
}

ClassificationReport classification_report(const std::vector<float>& probs, const std::vector<int64_t>& labels,
                                           int num_classes, const std::vector<std::string>& class_names,
                                           const ReportOptions& options) {
  const int k = num_classes;
  const size_t n = labels.size(), ku = static_cast<size_t>(std::max(k, 0));
  LANCET_CHECK(k >= 2, "classification report: needs at least 2 classes, got " << k);
  LANCET_CHECK(class_names.empty() || class_names.size() == ku,
               "classification report: " << class_names.size() << " class names for " << k << " classes");
  LANCET_CHECK(n > 0, "classification report: no samples");
  LANCET_CHECK(probs.size() == n * ku, "classification report: probs has " << probs.size() << " values, expected "
                                                                           << n * ku << " (" << n << " samples x "
                                                                           << k << " classes)");
  for (size_t i = 0; i < n; ++i) {
    LANCET_CHECK(labels[i] >= 0 && labels[i] < k,
                 "classification report: label " << labels[i] << " of sample " << i << " outside [0, " << k << ")");
    for (size_t c = 0; c < ku; ++c)
      LANCET_CHECK(std::isfinite(probs[i * ku + c]),
                   "classification report: probability of class " << c << " for sample " << i << " is not finite");
  }
  ClassificationReport r;
  r.num_classes = k;
  r.count = static_cast<int64_t>(n);
  for (int c = 0; c < k; ++c) r.class_names.push_back(name_of(class_names, c));
  r.binary = k == 2;
  LANCET_CHECK(r.binary || (!options.threshold && !options.target_sensitivity),
               "classification report: a decision threshold or target sensitivity needs a binary task, this one has "
                   << k << " classes");
  if (options.threshold) {
    const double t = *options.threshold;
    LANCET_CHECK(t >= 0 && t <= 1, "classification report: threshold " << t << " outside [0, 1]");
    r.threshold = t;
  }

  // Predictions and the confusion matrix.
  r.labels = labels;
  r.predicted = r.binary ? std::vector<int64_t>(n) : argmax_rows(probs.data(), static_cast<int64_t>(n), k);
  if (r.binary)
    for (size_t i = 0; i < n; ++i) r.predicted[i] = static_cast<double>(probs[i * 2 + 1]) >= r.threshold ? 1 : 0;
  r.cm = ConfusionMatrix(k);
  for (size_t i = 0; i < n; ++i) r.cm.add(labels[i], r.predicted[i]);
  r.accuracy = r.cm.accuracy();
  r.balanced_accuracy = r.cm.balanced_accuracy();

  // Per class from one-vs-rest counts. Macro: plain mean over all k classes; weighted: by support.
  r.macro.support = r.weighted.support = r.macro.predicted = r.weighted.predicted = r.count;
  for (int c = 0; c < k; ++c) {
    ClassMetrics m;
    for (int o = 0; o < k; ++o) {
      m.support += r.cm.at(c, o);
      m.predicted += r.cm.at(o, c);
    }
    const int64_t tp = r.cm.at(c, c), fp = m.predicted - tp, fn = m.support - tp;
    const int64_t tn = r.count - tp - fp - fn;
    m.precision = ratio(tp, tp + fp);
    m.recall = ratio(tp, tp + fn);
    m.specificity = ratio(tn, tn + fp);
    m.f1 = ratio(2 * tp, 2 * tp + fp + fn);
    r.per_class.push_back(m);
  }
  for (const ClassMetrics& m : r.per_class) {
    const double w = static_cast<double>(m.support) / static_cast<double>(r.count);
    r.macro.precision += m.precision / k;
    r.macro.recall += m.recall / k;
    r.macro.specificity += m.specificity / k;
    r.macro.f1 += m.f1 / k;
    r.weighted.precision += m.precision * w;
    r.weighted.recall += m.recall * w;
    r.weighted.specificity += m.specificity * w;
    r.weighted.f1 += m.f1 * w;
  }

  // AUROC.
  auto column = [&](int c) {
    std::vector<double> s(n);
    for (size_t i = 0; i < n; ++i) s[i] = probs[i * ku + static_cast<size_t>(c)];
    return s;
  };
  auto is_class = [&](int c) {
    std::vector<bool> p(n);
    for (size_t i = 0; i < n; ++i) p[i] = labels[i] == c;
    return p;
  };
  if (r.binary) {
    r.auroc = roc_auc(column(1), is_class(1));
    r.auroc_micro = kNaN;
  } else {
    double sum = 0;
    int used = 0;
    for (int c = 0; c < k; ++c) {
      const double a = roc_auc(column(c), is_class(c));
      r.auroc_per_class.push_back(a);
      if (std::isnan(a)) {
        r.auroc_skipped.push_back(c);
      } else {
        sum += a;
        ++used;
      }
    }
    r.auroc = used ? sum / used : kNaN;
    std::vector<double> all(probs.begin(), probs.end());
    std::vector<bool> onehot(n * ku);
    for (size_t i = 0; i < n; ++i) onehot[i * ku + static_cast<size_t>(labels[i])] = true;
    r.auroc_micro = roc_auc(all, onehot);
  }

  if (options.target_sensitivity) {
    const double target = *options.target_sensitivity;
    LANCET_CHECK(target > 0 && target <= 1, "classification report: target sensitivity " << target << " outside (0, 1]");
    const RocPoints roc = roc_points(column(1), is_class(1));
    const int64_t pos = roc.tps.back(), neg = roc.fps.back();
    LANCET_CHECK(pos > 0, "classification report: target sensitivity needs samples of class '" << r.class_names[1]
                                                                                               << "', there are none");
    for (size_t i = 0; i < roc.tps.size(); ++i) {
      const double sens = static_cast<double>(roc.tps[i]) / static_cast<double>(pos);
      if (sens >= target) {
        r.operating_point = OperatingPoint{target, roc.thresholds[i], sens, neg ? 1.0 - ratio(roc.fps[i], neg) : kNaN};
        break;
      }
    }
  }
  return r;
}

Json ClassificationReport::to_json() const {
  Json j;
  j["count"] = count;
  j["num_classes"] = num_classes;
  j["class_names"] = class_names;
  j["decision"] = binary ? Json{{"rule", "P(" + class_names[1] + ") >= threshold"}, {"threshold", threshold}}
                         : Json{{"rule", "argmax"}};
  j["accuracy"] = accuracy;
  j["balanced_accuracy"] = balanced_accuracy;
  Json classes = Json::array(), recall = Json::object(), matrix = Json::array();
  for (int c = 0; c < num_classes; ++c) {
    Json m = class_json(per_class[static_cast<size_t>(c)]);
    m["class"] = class_names[static_cast<size_t>(c)];
    classes.push_back(m);
    recall[class_names[static_cast<size_t>(c)]] = per_class[static_cast<size_t>(c)].recall;
    Json row = Json::array();
    for (int p = 0; p < num_classes; ++p) row.push_back(cm.at(c, p));
    matrix.push_back(row);
  }
  j["per_class"] = classes;
  j["macro_avg"] = class_json(macro);
  j["weighted_avg"] = class_json(weighted);
  j["recall"] = recall;  // by class name, as ConfusionMatrix::to_json writes it
  j["confusion_matrix"] = matrix;
  j["confusion_matrix_layout"] = "rows: label, columns: prediction";
  Json auroc_j;
  if (binary) {
    auroc_j = Json{{"binary", number(auroc)}, {"score", "P(" + class_names[1] + ")"}};
  } else {
    Json per = Json::object(), skipped = Json::array();
    for (int c = 0; c < num_classes; ++c)
      per[class_names[static_cast<size_t>(c)]] = number(auroc_per_class[static_cast<size_t>(c)]);
    for (int c : auroc_skipped) skipped.push_back(class_names[static_cast<size_t>(c)]);
    auroc_j = Json{{"ovr_macro", number(auroc)},
                   {"micro", number(auroc_micro)},
                   {"per_class", per},
                   {"skipped", skipped},
                   {"skipped_reason", "class without both positive and negative samples"}};
  }
  j["auroc"] = auroc_j;
  if (operating_point)
    j["operating_point"] = Json{{"target_sensitivity", operating_point->target_sensitivity},
                                {"threshold", operating_point->threshold},
                                {"sensitivity", operating_point->sensitivity},
                                {"specificity", number(operating_point->specificity)}};
  return j;
}

std::string ClassificationReport::to_text() const {
  std::ostringstream os;
  os << std::fixed << std::setprecision(4);
  size_t w = 12;
  for (const auto& name : class_names) w = std::max(w, name.size() + 2);
  os << "images            " << count << "\n";
  if (binary)
    os << "decision          P(" << class_names[1] << ") >= " << threshold << "\n";
  else
    os << "decision          argmax\n";
  os << "accuracy          " << accuracy << "\n"
     << "balanced accuracy " << balanced_accuracy << "\n";
  if (binary) {
    os << "AUROC             " << auroc << "\n";
  } else {
    os << "AUROC (OvR macro) " << auroc;
    if (!auroc_skipped.empty()) {
      os << "  (skipped, not both positives and negatives:";
      for (int c : auroc_skipped) os << " " << class_names[static_cast<size_t>(c)];
      os << ")";
    }
    os << "\nAUROC (micro)     " << auroc_micro << "\n";
  }
  os << "\n" << std::left << std::setw(static_cast<int>(w)) << "class" << std::right << std::setw(10) << "precision"
     << std::setw(9) << "recall" << std::setw(12) << "specificity" << std::setw(8) << "f1" << std::setw(9) << "support";
  if (!binary) os << std::setw(8) << "AUROC";
  os << "\n";
  // auroc: a class's one-vs-rest AUROC ("-" when skipped); nullopt leaves the column empty.
  auto row = [&](const std::string& name, const ClassMetrics& m, std::optional<double> auroc_c) {
    os << std::left << std::setw(static_cast<int>(w)) << name << std::right << std::setw(10) << m.precision
       << std::setw(9) << m.recall << std::setw(12) << m.specificity << std::setw(8) << m.f1 << std::setw(9)
       << m.support;
    if (auroc_c) {
      if (std::isnan(*auroc_c))
        os << std::setw(8) << "-";
      else
        os << std::setw(8) << *auroc_c;
    }
    os << "\n";
  };
  for (int c = 0; c < num_classes; ++c)
    row(class_names[static_cast<size_t>(c)], per_class[static_cast<size_t>(c)],
        binary ? std::nullopt : std::optional<double>(auroc_per_class[static_cast<size_t>(c)]));
  row("macro avg", macro, std::nullopt);
  row("weighted avg", weighted, std::nullopt);
  os << "\nconfusion matrix (rows: label, columns: prediction)\n" << std::setw(static_cast<int>(w)) << "";
  size_t cw = 8;
  for (const auto& name : class_names) cw = std::max(cw, name.size() + 1);
  for (const auto& name : class_names) os << std::setw(static_cast<int>(cw)) << name;
  os << "\n";
  for (int c = 0; c < num_classes; ++c) {
    os << std::left << std::setw(static_cast<int>(w)) << class_names[static_cast<size_t>(c)] << std::right;
    for (int p = 0; p < num_classes; ++p) os << std::setw(static_cast<int>(cw)) << cm.at(c, p);
    os << "\n";
  }
  if (operating_point)
    // The threshold is a float score: printed in full, so that applying it reproduces the point.
    os << "\nsensitivity >= " << operating_point->target_sensitivity << " at P(" << class_names[1] << ") >= "
       << std::defaultfloat << std::setprecision(std::numeric_limits<float>::max_digits10)
       << operating_point->threshold << std::fixed << std::setprecision(4) << ": sensitivity "
       << operating_point->sensitivity << ", specificity " << operating_point->specificity << "\n";
  return os.str();
}

void write_predictions_csv(std::ostream& os, const ClassificationReport& report, const std::vector<float>& probs,
                           const std::vector<std::string>& sources) {
  const size_t n = report.predicted.size(), k = static_cast<size_t>(report.num_classes);
  LANCET_CHECK(probs.size() == n * k, "predictions csv: probs has " << probs.size() << " values, the report "
                                                                    << n << " samples x " << k << " classes");
  LANCET_CHECK(sources.empty() || sources.size() == n,
               "predictions csv: " << sources.size() << " sources for " << n << " samples");
  os << (sources.empty() ? "index,label,predicted" : "index,source,label,predicted");
  for (const auto& name : report.class_names) os << "," << csv_field("prob_" + name);
  const std::streamsize precision = os.precision(std::numeric_limits<float>::max_digits10);  // round-trips
  os << "\n";
  for (size_t i = 0; i < n; ++i) {
    os << i << ",";
    if (!sources.empty()) os << csv_field(sources[i]) << ",";
    os << report.labels[i] << "," << report.predicted[i];
    for (size_t c = 0; c < k; ++c) os << "," << probs[i * k + c];
    os << "\n";
  }
  os.precision(precision);
}

}  // namespace lancet
