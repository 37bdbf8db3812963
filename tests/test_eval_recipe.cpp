// `lancet eval` preprocesses as training did: a run's final.h5 and checkpoints carry its resolved
// configuration (/train config), and eval takes every pixel setting it is not given from there
// (recipe, image size, normalisation, DICOM window); a given setting that differs is used and
// logged with both values; a weights file without a configuration (a PyTorch export) keeps the
// given settings and says so.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "cli_util.h"
#include "comm/communicator.h"
#include "data/h5file.h"
#include "data/synth.h"
#include "tests/expect_error.h"
#include "trainer/checkpoint.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// One tiny run trained with CLAHE, a non-default image size and normalisation, shared by the tests.
class EvalRecipe : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tmp_ = std::make_unique<TempDir>("eval_recipe");
    SynthOptions so;
    so.train = 96;
    so.val = 48;
    so.image_size = 40;
    write_synthetic_cxr(*tmp_ / "data", so);
    config_ = default_config();
    for (const char* s : {"model.widths=[8, 16, 32, 64]", "model.depths=[1, 1, 1, 1]", "model.head_hidden=32",
                          "data.image_size=24", "data.mean=[0.4]", "data.std=[0.3]",
                          "data.preprocess=[{op: clahe, clip_limit: 3.0, tile_grid: 4}]", "train.epochs=1",
                          "train.batch_size=16", "train.threads=2"})
      apply_override(config_, s);
    apply_override(config_, "data.dir=" + *tmp_ / "data");
    apply_override(config_, "train.out=" + *tmp_ / "run");
    auto comm = make_single_process_communicator();
    std::ostringstream log;
    summary_ = run_training(config_, *comm, log);
  }
  static void TearDownTestSuite() { tmp_.reset(); }

  static std::string final_h5() { return *tmp_ / "run/final.h5"; }
  // `lancet eval` of `weights` on the run's validation split, with extra flags, in batches of
  // 64 as the run validated; the report in TAG.json, the predictions in TAG.csv.
  static RunResult eval(const std::string& weights, const std::string& flags, const std::string& tag) {
    return run_lancet("eval --weights " + weights + " --data " + *tmp_ / "data" + " --batch-size 64 --threads 2 " +
                      flags + " --report " + *tmp_ / (tag + ".json") + " --predictions " + *tmp_ / (tag + ".csv"));
  }
  static Json report(const std::string& tag) { return Json::parse(std::ifstream(*tmp_ / (tag + ".json"))); }
  static std::string predictions(const std::string& tag) { return read_text(*tmp_ / (tag + ".csv")); }

  static std::unique_ptr<TempDir> tmp_;
  static Json config_;
  static TrainSummary summary_;
};
std::unique_ptr<TempDir> EvalRecipe::tmp_;
Json EvalRecipe::config_;
TrainSummary EvalRecipe::summary_;

// The run's recipe given explicitly, spelled differently (an integer clip limit, keys reordered).
const char* const kRecipe = "--image-size 24 --set data.mean=[0.4] --set data.std=[0.3] "
                            "--set 'data.preprocess=[{tile_grid: 4, op: clahe, clip_limit: 3}]'";

}  // namespace

TEST_F(EvalRecipe, WeightsFilesCarryTheRunConfig) {
  const auto checkpoints = list_checkpoints(*tmp_ / "run");
  ASSERT_FALSE(checkpoints.empty());
  for (const std::string& path : {final_h5(), *tmp_ / "run/best.h5", checkpoints.back()}) {
    if (!std::filesystem::exists(path)) continue;  // best.h5 only when early stopping monitors
    const std::optional<Json> saved = read_run_config(H5File::open_read(path));
    ASSERT_TRUE(saved.has_value()) << path;
    EXPECT_EQ(saved->at("data"), config_.at("data")) << path;
  }
  // Still an interchange weights file: the model loads, /model holds only the state_dict.
  H5File f = H5File::open_read(final_h5());
  auto model = load_model(final_h5());
  EXPECT_EQ(f.list("/model").size(), model->state_dict().size());
  // ... and it still cannot resume a run.
  auto opt = make_optimizer(optim_config(config_), model->named_parameters());
  expect_error([&] { load_checkpoint(final_h5(), *model, *opt, "adam", config_); },
               {final_h5(), "not a training checkpoint"});
}

TEST_F(EvalRecipe, EvalDefaultsToTheTrainedRecipe) {
  RunResult r = eval(final_h5(), "", "implicit");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: preprocessing as in training (" + final_h5() + "): data.dicom.window null, "
                                 "data.preprocess [{\"clip_limit\":3.0,\"op\":\"clahe\",\"tile_grid\":4}], "
                                 "data.image_size 24, data.bit_depth 8, data.mean [0.4"))
      << r.output;
  EXPECT_FALSE(contains(r.output, "given, but")) << r.output;
  // The figures the run itself reported for the same images.
  EXPECT_DOUBLE_EQ(report("implicit")["loss"].get<double>(), summary_.final_eval.loss);
  EXPECT_DOUBLE_EQ(report("implicit")["accuracy"].get<double>(), summary_.final_eval.cm.accuracy());
  EXPECT_EQ(report("implicit")["preprocessing"]["image_size"], 24);

  // The recipe given explicitly: the same predictions, nothing logged as different.
  r = eval(final_h5(), kRecipe, "explicit");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_FALSE(contains(r.output, "given, but")) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: preprocessing as in training (" + final_h5() + "): data.dicom.window null, data.bit_depth 8, data.classes []\n"))
      << r.output;  // the settings not given
  EXPECT_EQ(predictions("explicit"), predictions("implicit"));

  // A checkpoint carries the recipe too (after one epoch it holds final.h5's weights).
  r = eval(list_checkpoints(*tmp_ / "run").back(), "", "checkpoint");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: preprocessing as in training")) << r.output;
  EXPECT_EQ(predictions("checkpoint"), predictions("implicit"));
}

TEST_F(EvalRecipe, AGivenSettingThatDiffersIsUsedAndLogged) {
  ASSERT_EQ(eval(final_h5(), "", "base").status, 0);
  const double base = report("base")["loss"].get<double>();

  RunResult r = eval(final_h5(), "--image-size 32", "size");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: data.image_size 32 given, but the model was trained with 24: using 32"))
      << r.output;
  EXPECT_EQ(report("size")["preprocessing"]["image_size"], 32);
  EXPECT_NE(report("size")["loss"].get<double>(), base);

  r = eval(final_h5(), "--set data.preprocess=[]", "no_clahe");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: data.preprocess [] given, but the model was trained with "
                                 "[{\"clip_limit\":3.0,\"op\":\"clahe\",\"tile_grid\":4}]: using []"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "data.image_size 24")) << r.output;  // the others still from training
  EXPECT_NE(report("no_clahe")["loss"].get<double>(), base);

  // A --config file gives settings too.
  std::ofstream(*tmp_ / "mean.yaml") << "data:\n  mean: [0.5]\n";
  r = eval(final_h5(), "--config " + *tmp_ / "mean.yaml", "yaml");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: data.mean [0.5] given, but the model was trained with [0.4")) << r.output;
  EXPECT_NE(report("yaml")["loss"].get<double>(), base);

  // The model decides the channels it reads.
  r = eval(final_h5(), "--channels 3", "channels");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: data.channels 3 given, but the model reads 1: using 1")) << r.output;
  EXPECT_EQ(predictions("channels"), predictions("base"));
}

TEST_F(EvalRecipe, WeightsWithoutARecipeKeepTheGivenSettings) {
  // As a PyTorch export would be: /model only.
  const std::string bare = *tmp_ / "bare.h5";
  {
    H5File f = H5File::open_read(final_h5());
    save_weights(bare, *load_model(final_h5()), read_model_config(f));
  }
  EXPECT_FALSE(read_run_config(H5File::open_read(bare)).has_value());
  RunResult r = eval(bare, "", "bare");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: no training recipe in " + bare)) << r.output;
  EXPECT_EQ(report("bare")["preprocessing"]["image_size"], 64);  // lancet's default, as before
  // The same as the run's own final.h5 evaluated with lancet's defaults given explicitly.
  r = eval(final_h5(), "--image-size 64 --set data.preprocess=[] --set data.mean=[0.5] --set data.std=[0.25]",
           "defaults");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(predictions("bare"), predictions("defaults"));
  r = eval(bare, kRecipe, "bare_explicit");
  ASSERT_EQ(r.status, 0) << r.output;
  ASSERT_EQ(eval(final_h5(), "", "trained").status, 0);
  EXPECT_EQ(predictions("bare_explicit"), predictions("trained"));
}

TEST_F(EvalRecipe, ADamagedRunConfigIsOneLineNamingTheFile) {
  const std::string path = *tmp_ / "damaged.h5";
  {
    H5File src = H5File::open_read(final_h5());
    H5File f = H5File::create_atomic(path);
    write_weights(f, *load_model(final_h5()), read_model_config(src));
    f.create_group("/train");
    f.set_attr("/train", "config", "{not json");
    f.commit();
  }
  expect_error([&] { read_run_config(H5File::open_read(path)); }, {path, "/train 'config'", "not valid JSON"});
  const RunResult r = eval(path, "", "damaged");
  EXPECT_NE(r.status, 0);
  EXPECT_TRUE(contains(r.output, path)) << r.output;
  EXPECT_FALSE(std::filesystem::exists(*tmp_ / "damaged.json"));
}

// A run that declared its class order (data.classes) is evaluated in that order: label i is
// output i as in training, unless the order is given, which is logged.
TEST_F(EvalRecipe, TheTrainedClassOrderIsTaken) {
  const std::string path = *tmp_ / "reordered.h5";
  {
    H5File src = H5File::open_read(final_h5());
    Json run = *read_run_config(src);
    run["data"]["classes"] = Json::array({"opacity", "normal"});
    H5File f = H5File::create_atomic(path);
    write_weights(f, *load_model(final_h5()), read_model_config(src));
    f.create_group("/train");
    f.set_attr("/train", "config", run.dump());
    f.commit();
  }
  RunResult r = eval(path, "", "reordered");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "data.classes [\"opacity\",\"normal\"]")) << r.output;
  EXPECT_EQ(report("reordered")["class_names"], Json::array({"opacity", "normal"}));
  r = eval(path, "--set data.classes=[normal,opacity]", "inferred_order");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "eval: data.classes [\"normal\",\"opacity\"] given, but the model was trained with "
                                 "[\"opacity\",\"normal\"]"))
      << r.output;
  EXPECT_EQ(report("inferred_order")["class_names"], Json::array({"normal", "opacity"}));
}
