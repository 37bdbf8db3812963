// Config system: defaults, YAML merge, --set overrides, type and key checks.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>

#include "kernels/error.h"
#include "trainer/config.h"

using namespace lancet;

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
