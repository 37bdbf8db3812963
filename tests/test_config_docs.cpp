// docs/config.md is the configuration reference: every setting the code has must be there
// with its default, and nothing there may be missing from the code. Also: unknown keys get a
// did-you-mean hint.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <regex>
#include <string>

#include "layers/medicalcnn.h"
#include "tests/expect_error.h"
#include "trainer/config.h"

using namespace lancet;
using lancet::testing::expect_error;

namespace {

void flatten(const Json& j, const std::string& prefix, std::map<std::string, Json>& out) {
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) flatten(it.value(), prefix.empty() ? it.key() : prefix + "." + it.key(), out);
  } else {
    out[prefix] = j;
  }
}

// Equal as JSON, numbers compared to float precision (the model stores floats).
bool same_value(const Json& a, const Json& b) {
  if (a.is_number() && b.is_number()) {
    const double x = a.get<double>(), y = b.get<double>();
    return std::fabs(x - y) <= 1e-6 * std::max(1.0, std::fabs(y));
  }
  if (a.is_array() && b.is_array()) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
      if (!same_value(a[i], b[i])) return false;
    return true;
  }
  return a == b;
}

}  // namespace

TEST(ConfigDocs, EverySettingDocumentedWithItsDefault) {
  std::ifstream f(std::string(LANCET_SOURCE_DIR) + "/docs/config.md");
  ASSERT_TRUE(f.good()) << "docs/config.md missing";
  // Rows: | `section.key` | `default` | meaning |
  const std::regex row(R"(^\| `([a-z0-9_]+(?:\.[a-z0-9_]+)+)` \| `([^`]*)` \|)");
  std::map<std::string, Json> documented;
  for (std::string line; std::getline(f, line);) {
    std::smatch m;
    if (!std::regex_search(line, m, row)) continue;
    EXPECT_EQ(documented.count(m[1]), 0u) << m[1] << " documented twice";
    try {
      documented[m[1]] = Json::parse(m[2].str());
    } catch (const Json::exception& e) {
      ADD_FAILURE() << m[1] << ": default `" << m[2] << "` is not JSON: " << e.what();
    }
  }

  std::map<std::string, Json> code;
  Json defaults = default_config();
  defaults.erase("model");
  flatten(defaults, "", code);
  const MedicalCNNConfig model_defaults;
  Json model = model_defaults.to_json();
  model["context_width"] = model_defaults.context_width;  // to_json resolves 0 to its value
  for (auto it = model.begin(); it != model.end(); ++it) code["model." + it.key()] = it.value();

  for (const auto& [key, value] : code) {
    const auto it = documented.find(key);
    if (it == documented.end()) {
      ADD_FAILURE() << key << " (default " << value.dump() << ") is not in docs/config.md";
      continue;
    }
    EXPECT_TRUE(same_value(it->second, value))
        << key << ": docs/config.md says " << it->second.dump() << ", the code " << value.dump();
  }
  for (const auto& [key, value] : documented) EXPECT_EQ(code.count(key), 1u) << key << " is documented but not a setting";
}

TEST(ConfigDocs, UnknownKeysGetADidYouMeanHint) {
  Json c = default_config();
  expect_error([&] { apply_override(c, "train.batchsize=8"); },
               {"unknown setting 'train.batchsize'", "did you mean 'train.batch_size'?", "valid keys in train"});
  expect_error([&] { apply_override(c, "optim.learning_rate=0.1"); }, {"unknown setting 'optim.learning_rate'"});
  expect_error([&] { apply_override(c, "trian.epochs=3"); }, {"did you mean 'train'?"});
  // The model section too (its values are the model's to check; its keys are checked here).
  expect_error([&] { apply_override(c, "model.widht=[8, 16, 32, 64]"); },
               {"unknown setting 'model.widht'", "did you mean 'model.widths'?", "valid keys in model", "head_hidden"});
  expect_error([&] { merge_config(c, Json::parse(R"({"model": {"head_hiden": 32}})"), ""); },
               {"unknown setting 'model.head_hiden'", "did you mean 'model.head_hidden'?"});
  expect_error([&] { apply_override(c, "model.colour=1"); }, {"unknown setting 'model.colour'", "valid keys in model"});
  apply_override(c, "model.widths=[8, 16, 32, 64]");
  apply_override(c, "model.dropout=[0.1, 0.1]");
  EXPECT_EQ(c["model"]["widths"], Json({8, 16, 32, 64}));
  EXPECT_EQ(MedicalCNNConfig::from_json(c["model"]).widths, (std::vector<int>{8, 16, 32, 64}));
}

TEST(ConfigDocs, NsysStepsAreARange) {
  Json c = default_config();
  apply_override(c, "train.device=cuda");
  apply_override(c, "train.nsys_steps=20");
  expect_error([&] { train_config(c); }, {"train.nsys_steps must be FIRST:LAST", "'20'"});
  apply_override(c, "train.nsys_steps=5:3");
  expect_error([&] { train_config(c); }, {"train.nsys_steps 5:3", "FIRST <= LAST"});
  apply_override(c, "train.nsys_steps=20:30");
#ifdef LANCET_WITH_CUDA
  const TrainConfig t = train_config(c);
  EXPECT_EQ(t.nsys_first, 20);
  EXPECT_EQ(t.nsys_last, 30);
#else
  expect_error([&] { train_config(c); }, {"train.nsys_steps 20:30", "no CUDA"});
#endif
}

// cudaProfilerStart needs a CUDA device: training on the CPU with a capture range is refused up
// front, naming the flag and the device, in CUDA and CPU-only builds alike (a CUDA build on a
// machine without a driver once failed mid-run on "cudaProfilerStart() failed").
TEST(ConfigDocs, NsysStepsNeedACudaTrainingDevice) {
  Json c = default_config();
  apply_override(c, "train.nsys_steps=2:3");
  for (const std::string device : {"cpu", "cpu:1"}) {
    apply_override(c, "train.device=" + device);
    expect_error([&] { train_config(c); },
                 {"train.nsys_steps (--nsys-steps) 2:3", "CUDA training device", "train.device is '" + device + "'"});
  }
  apply_override(c, "train.nsys_steps=");
  EXPECT_EQ(train_config(c).nsys_first, 0);  // off: any device
}
