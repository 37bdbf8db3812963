// Metrics: the training loop's confusion matrix, and the clinical report checked against
// scikit-learn (tests/fixtures/metrics_cases.json from tests/reference/make_metric_fixtures.py).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "tests/expect_error.h"
#include "trainer/metrics.h"

using namespace lancet;
using lancet::testing::expect_error;

TEST(Metrics, ConfusionMatrix) {
  ConfusionMatrix cm(3);
  // labels:      0 0 0 0 1 1 2
  // predictions: 0 0 1 2 1 1 0
  const int64_t l[] = {0, 0, 0, 0, 1, 1, 2}, p[] = {0, 0, 1, 2, 1, 1, 0};
  for (int i = 0; i < 7; ++i) cm.add(l[i], p[i]);
  EXPECT_DOUBLE_EQ(cm.accuracy(), 4.0 / 7);
  EXPECT_DOUBLE_EQ(cm.recall(0), 0.5);
  EXPECT_DOUBLE_EQ(cm.recall(1), 1.0);
  EXPECT_DOUBLE_EQ(cm.recall(2), 0.0);
  EXPECT_DOUBLE_EQ(cm.balanced_accuracy(), 0.5);
  EXPECT_EQ(cm.at(0, 2), 1);
  EXPECT_THROW(cm.add(3, 0), Error);
  const Json j = cm.to_json({"a", "b", "c"});
  EXPECT_EQ(j["confusion_matrix"][0], Json({2, 1, 1}));
  EXPECT_DOUBLE_EQ(j["recall"]["b"].get<double>(), 1.0);
}

namespace {

constexpr double kExact = 1e-9, kAuc = 1e-6;

Json load_cases() {
  const std::string path = std::string(LANCET_SOURCE_DIR) + "/tests/fixtures/metrics_cases.json";
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << "cannot open " << path;
  return Json::parse(f)["cases"];
}

struct Case {
  std::string name;
  int k;
  std::vector<std::string> names;
  std::vector<float> probs;
  std::vector<int64_t> labels;
  ReportOptions options;
  Json expected;
};

Case read_case(const Json& c) {
  Case r;
  r.name = c["name"];
  r.k = c["num_classes"];
  r.names = c["class_names"].get<std::vector<std::string>>();
  for (double v : c["probs"]) r.probs.push_back(static_cast<float>(v));  // exact: written from float32
  r.labels = c["labels"].get<std::vector<int64_t>>();
  if (c["options"].contains("threshold")) r.options.threshold = c["options"]["threshold"].get<double>();
  if (c["options"].contains("target_sensitivity"))
    r.options.target_sensitivity = c["options"]["target_sensitivity"].get<double>();
  r.expected = c["expected"];
  return r;
}

void expect_class(const ClassMetrics& m, const Json& e, const std::string& what) {
  EXPECT_NEAR(m.precision, e["precision"].get<double>(), kExact) << what;
  EXPECT_NEAR(m.recall, e["recall"].get<double>(), kExact) << what;
  EXPECT_NEAR(m.specificity, e["specificity"].get<double>(), kExact) << what;
  EXPECT_NEAR(m.f1, e["f1"].get<double>(), kExact) << what;
  if (e.contains("support")) {
    EXPECT_EQ(m.support, e["support"].get<int64_t>()) << what;
    EXPECT_EQ(m.predicted, e["predicted"].get<int64_t>()) << what;
  }
}

}  // namespace

TEST(Metrics, ReportMatchesScikitLearn) {
  const Json cases = load_cases();
  ASSERT_GE(cases.size(), 5u);
  for (const Json& c : cases) {
    const Case t = read_case(c);
    SCOPED_TRACE(t.name);
    const Json& e = t.expected;
    const ClassificationReport r = classification_report(t.probs, t.labels, t.k, t.names, t.options);
    EXPECT_EQ(r.binary, t.k == 2);
    EXPECT_EQ(r.count, static_cast<int64_t>(t.labels.size()));
    EXPECT_EQ(r.predicted, e["predicted"].get<std::vector<int64_t>>());
    EXPECT_NEAR(r.accuracy, e["accuracy"].get<double>(), kExact);
    EXPECT_NEAR(r.balanced_accuracy, e["balanced_accuracy"].get<double>(), kExact);
    for (int a = 0; a < t.k; ++a)
      for (int p = 0; p < t.k; ++p) EXPECT_EQ(r.cm.at(a, p), e["confusion_matrix"][a][p].get<int64_t>());
    ASSERT_EQ(r.per_class.size(), static_cast<size_t>(t.k));
    for (int cl = 0; cl < t.k; ++cl) expect_class(r.per_class[cl], e["per_class"][cl], "class " + t.names[cl]);
    expect_class(r.macro, e["macro"], "macro");
    expect_class(r.weighted, e["weighted"], "weighted");
    EXPECT_NEAR(r.auroc, e["auroc"].get<double>(), kAuc);
    const Json j = r.to_json();
    if (t.k > 2) {
      EXPECT_NEAR(r.auroc_micro, e["auroc_micro"].get<double>(), kAuc);
      EXPECT_EQ(r.auroc_skipped, e["auroc_skipped"].get<std::vector<int>>());
      for (int cl = 0; cl < t.k; ++cl) {
        const Json& a = e["auroc_per_class"][cl];
        if (a.is_null()) {
          EXPECT_TRUE(std::isnan(r.auroc_per_class[cl])) << "class " << cl;
        } else {
          EXPECT_NEAR(r.auroc_per_class[cl], a.get<double>(), kAuc) << "class " << cl;
        }
      }
      EXPECT_EQ(j["auroc"]["skipped"].size(), e["auroc_skipped"].size());
      for (int cl : r.auroc_skipped) EXPECT_TRUE(j["auroc"]["per_class"][t.names[cl]].is_null());
      EXPECT_NEAR(j["auroc"]["ovr_macro"].get<double>(), e["auroc"].get<double>(), kAuc);
      EXPECT_EQ(j["decision"]["rule"], "argmax");
    } else {
      EXPECT_NEAR(j["auroc"]["binary"].get<double>(), e["auroc"].get<double>(), kAuc);
      EXPECT_DOUBLE_EQ(j["decision"]["threshold"].get<double>(), t.options.threshold.value_or(0.5));
    }
    ASSERT_EQ(r.operating_point.has_value(), e.contains("operating_point"));
    if (r.operating_point) {
      const Json& op = e["operating_point"];
      EXPECT_NEAR(r.operating_point->threshold, op["threshold"].get<double>(), kExact);
      EXPECT_NEAR(r.operating_point->sensitivity, op["sensitivity"].get<double>(), kExact);
      EXPECT_NEAR(r.operating_point->specificity, op["specificity"].get<double>(), kExact);
      EXPECT_NEAR(j["operating_point"]["threshold"].get<double>(), op["threshold"].get<double>(), kExact);
    }
    // The JSON carries the same numbers, and the keys ConfusionMatrix::to_json wrote before.
    EXPECT_NEAR(j["accuracy"].get<double>(), e["accuracy"].get<double>(), kExact);
    EXPECT_EQ(j["confusion_matrix"], e["confusion_matrix"]);
    EXPECT_EQ(j["count"].get<int64_t>(), r.count);
    EXPECT_NEAR(j["per_class"][1]["f1"].get<double>(), e["per_class"][1]["f1"].get<double>(), kExact);
    EXPECT_NEAR(j["recall"][t.names[1]].get<double>(), e["per_class"][1]["recall"].get<double>(), kExact);
    EXPECT_NEAR(j["weighted_avg"]["f1"].get<double>(), e["weighted"]["f1"].get<double>(), kExact);
    // The text report has one row per class and the averages.
    const std::string text = r.to_text();
    for (const auto& name : t.names) EXPECT_NE(text.find("\n" + name + " "), std::string::npos) << name;
    EXPECT_NE(text.find("macro avg"), std::string::npos);
    EXPECT_NE(text.find("weighted avg"), std::string::npos);
  }
}

TEST(Metrics, RocAucTiesAndDegenerateLabels) {
  // All scores tied: one ROC point at (1, 1), the diagonal.
  EXPECT_DOUBLE_EQ(roc_auc({0.3, 0.3, 0.3, 0.3}, {true, false, true, false}), 0.5);
  // A tie between one positive and one negative counts half.
  EXPECT_DOUBLE_EQ(roc_auc({0.9, 0.5, 0.5, 0.1}, {true, true, false, false}), 0.875);
  EXPECT_TRUE(std::isnan(roc_auc({0.1, 0.2}, {true, true})));
  EXPECT_TRUE(std::isnan(roc_auc({}, {})));
}

TEST(Metrics, PredictionsCsv) {
  const std::vector<float> probs = {0.75f, 0.25f, 0.25f, 0.75f, 0.5f, 0.5f};
  ReportOptions o;
  o.threshold = 0.5;
  const ClassificationReport r = classification_report(probs, {0, 0, 1}, 2, {"normal", "covid,19"}, o);
  std::ostringstream os;
  write_predictions_csv(os, r, probs);
  EXPECT_EQ(os.str(),
            "index,label,predicted,prob_normal,\"prob_covid,19\"\n"
            "0,0,0,0.75,0.25\n"
            "1,0,1,0.25,0.75\n"
            "2,1,1,0.5,0.5\n");
  // With each sample's source (quoted where CSV needs it).
  std::ostringstream with;
  write_predictions_csv(with, r, probs, {"a/x.png", "b,y.png", "pack.h5:val[2]"});
  EXPECT_EQ(with.str(),
            "index,source,label,predicted,prob_normal,\"prob_covid,19\"\n"
            "0,a/x.png,0,0,0.75,0.25\n"
            "1,\"b,y.png\",0,1,0.25,0.75\n"
            "2,pack.h5:val[2],1,1,0.5,0.5\n");
  expect_error([&] { write_predictions_csv(with, r, probs, {"one"}); }, {"predictions csv", "1 sources for 3 samples"});
}

TEST(Metrics, ReportErrorsNameTheCause) {
  const std::vector<float> p2 = {0.9f, 0.1f, 0.2f, 0.8f};
  expect_error([&] { classification_report(p2, {0, 2}, 2, {}); }, {"label 2", "sample 1", "[0, 2)"});
  expect_error([&] { classification_report(p2, {0, -1}, 2, {}); }, {"label -1", "outside"});
  expect_error([&] { classification_report(p2, {0, 1, 1}, 2, {}); }, {"probs has 4 values", "expected 6"});
  expect_error([&] { classification_report({}, {}, 2, {}); }, {"no samples"});
  expect_error([&] { classification_report(p2, {0, 1}, 2, {"a"}); }, {"1 class names", "2 classes"});
  expect_error([&] { classification_report({1.f, 1.f}, {0, 0}, 1, {}); }, {"at least 2 classes"});
  expect_error([&] { classification_report({NAN, 1.f, 0.f, 1.f}, {0, 1}, 2, {}); }, {"sample 0", "not finite"});
  ReportOptions o;
  o.threshold = 1.5;
  expect_error([&] { classification_report(p2, {0, 1}, 2, {}, o); }, {"threshold 1.5", "[0, 1]"});
  o = ReportOptions{};
  o.target_sensitivity = 0.0;
  expect_error([&] { classification_report(p2, {0, 1}, 2, {}, o); }, {"target sensitivity 0", "(0, 1]"});
  o.target_sensitivity = 0.9;
  expect_error([&] { classification_report(p2, {0, 0}, 2, {"neg", "pos"}, o); }, {"target sensitivity", "'pos'"});
  const std::vector<float> p3 = {0.5f, 0.3f, 0.2f};
  expect_error([&] { classification_report(p3, {0}, 3, {}, o); }, {"binary task", "3 classes"});
  o = ReportOptions{};
  o.threshold = 0.3;
  expect_error([&] { classification_report(p3, {0}, 3, {}, o); }, {"binary task", "3 classes"});
  const ClassificationReport r = classification_report(p2, {0, 1}, 2, {});
  std::ostringstream os;
  expect_error([&] { write_predictions_csv(os, r, p3); }, {"predictions csv", "3 values"});
}
