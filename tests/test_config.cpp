// Config system: defaults, YAML merge, --set overrides, type and key checks.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>

#include "kernels/error.h"
#include "tests/expect_error.h"
#include "trainer/config.h"

using namespace lancet;
using lancet::testing::expect_error;

namespace {
std::string what_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Config, DefaultsResolve) {
  const Json c = default_config();
  EXPECT_EQ(train_config(c).batch_size, 32);
  EXPECT_EQ(optim_config(c).name, "adam");
  EXPECT_EQ(data_config(c).image_size, 64);
}

TEST(Config, OverridesParseAsYaml) {
  Json c = default_config();
  apply_override(c, "optim.lr=3e-4");
  apply_override(c, "train.batch_size=8");
  apply_override(c, "model.widths=[16, 32, 64, 128]");
  apply_override(c, "data.synth.train=100");
  apply_override(c, "optim.lr=1");  // an integer where a float is expected is fine
  EXPECT_FLOAT_EQ(optim_config(c).lr, 1.0f);
  EXPECT_EQ(train_config(c).batch_size, 8);
  EXPECT_EQ(c["model"]["widths"], Json({16, 32, 64, 128}));
  EXPECT_EQ(data_config(c).synth_train, 100);
}

TEST(Config, RejectsUnknownKeysAndWrongTypes) {
  Json c = default_config();
  EXPECT_NE(what_of([&] { apply_override(c, "train.batchsize=8"); }).find("unknown setting 'train.batchsize'"),
            std::string::npos);
  EXPECT_NE(what_of([&] { apply_override(c, "train.batch_size=big"); }).find("must be an integer"), std::string::npos);
  EXPECT_NE(what_of([&] { apply_override(c, "nosuch.key=1"); }).find("unknown setting 'nosuch'"), std::string::npos);
  EXPECT_NE(what_of([&] { apply_override(c, "train.batch_size"); }).find("expected section.key=value"),
            std::string::npos);
  apply_override(c, "train.batch_size=0");
  EXPECT_NE(what_of([&] { train_config(c); }).find("train.batch_size must be at least 1"), std::string::npos);
  apply_override(c, "train.batch_size=4");
  apply_override(c, "optim.name=lamb");
  EXPECT_NE(what_of([&] { optim_config(c); }).find("'lamb'"), std::string::npos);
}

TEST(Config, YamlFileMerges) {
  const std::string path = ::testing::TempDir() + "/lancet_cfg_test.yaml";
  {
    std::ofstream f(path);
    f << "model:\n  widths: [8, 16, 32, 64]\n  depths: [1, 1, 1, 1]\ntrain:\n  epochs: 3\n  device: \"cpu\"\n"
         "optim:\n  name: sgd\n  lr: 0.05\n";
  }
  Json c = default_config();
  merge_config(c, load_yaml_file(path), "");
  EXPECT_EQ(train_config(c).epochs, 3);
  EXPECT_EQ(optim_config(c).name, "sgd");
  EXPECT_FLOAT_EQ(optim_config(c).lr, 0.05f);
  EXPECT_EQ(c["model"]["depths"], Json({1, 1, 1, 1}));
  std::remove(path.c_str());
  EXPECT_NE(what_of([&] { load_yaml_file(path); }).find("cannot open config file"), std::string::npos);
}

// Out-of-range values fail when the section is read, in one line naming the key and the value.
TEST(Config, RangeChecksNameTheKey) {
  struct Case {
    const char* set;
    std::function<void(const Json&)> read;
    std::vector<std::string> parts;
  };
  const auto optim = [](const Json& c) { optim_config(c); };
  const auto loss = [](const Json& c) { loss_config(c); };
  const auto data = [](const Json& c) { data_config(c); };
  const auto train = [](const Json& c) { train_config(c); };
  const std::vector<Case> cases = {
      {"optim.beta1=1", optim, {"optim.beta1 must be in [0, 1)", "got 1"}},
      {"optim.beta1=-0.1", optim, {"optim.beta1 must be in [0, 1)", "-0.1"}},
      {"optim.beta2=1.5", optim, {"optim.beta2 must be in [0, 1)", "1.5"}},
      {"optim.eps=0", optim, {"optim.eps must be positive", "got 0"}},
      {"optim.eps=-1e-8", optim, {"optim.eps must be positive", "-1e-08"}},
      {"optim.momentum=-0.5", optim, {"optim.momentum must be >= 0", "-0.5"}},
      {"optim.weight_decay=-0.01", optim, {"optim.weight_decay must be >= 0", "-0.01"}},
      {"loss.class_weights=[1, -2]", loss, {"loss.class_weights[1] must be finite and >= 0", "-2"}},
      {"loss.class_weights=[0, 0]", loss, {"loss.class_weights are all zero"}},
      {"data.synth.train=-5", data, {"data.synth.train must be >= 0", "-5"}},
      {"data.synth.val=-1", data, {"data.synth.val must be >= 0", "-1"}},
      {"data.synth.size=-32", data, {"data.synth.size must be at least 8", "-32"}},
      {"data.synth.seed=-1", data, {"data.synth.seed must be an integer >= 0", "-1"}},
      {"train.seed=-3", train, {"train.seed must be an integer >= 0", "-3"}},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.set);
    Json c = default_config();
    apply_override(c, k.set);
    expect_error([&] { k.read(c); }, k.parts);
  }
  // The edges that are allowed.
  Json c = default_config();
  for (const char* s : {"optim.beta1=0", "optim.beta2=0.9999", "optim.momentum=0", "loss.class_weights=[0, 3]",
                        "data.synth.val=0", "data.synth.seed=0"})
    apply_override(c, s);
  EXPECT_FLOAT_EQ(optim_config(c).beta1, 0.f);
  EXPECT_EQ(loss_config(c).class_weights, (std::vector<float>{0.f, 3.f}));
  EXPECT_EQ(data_config(c).synth_val, 0);
}
