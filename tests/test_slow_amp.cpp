// Emulated fp16 / bf16 training against fp32 on the synthetic task (labelled slow: a few
// minutes under the sanitizers, so only the main test pass runs it). The rest of the mixed
// precision tests are in test_amp.cpp.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "comm/communicator.h"
#include "trainer/metrics.h"
#include "trainer/trainer.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

std::vector<Json> jsonl(const std::string& path) {
  std::vector<Json> out;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);) out.push_back(Json::parse(line));
  return out;
}

TrainSummary train(const Json& c, std::string* log_text) {
  auto comm = make_single_process_communicator();
  std::ostringstream log;
  TrainSummary s = run_training(c, *comm, log);
  *log_text = log.str();
  return s;
}

class AmpTraining : public ::testing::Test {
 protected:
  void SetUp() override { setenv("LANCET_CACHE", (tmp_ / "cache").c_str(), 1); }
  TempDir tmp_{"slow_amp"};
};

}  // namespace

// fp16 and bf16 (emulated) reach fp32's validation figures on the synthetic task (2000 train /
// 400 val images at 64 px, 6 epochs, cosine schedule; about 6 s each). Measured: accuracy
// fp32 0.873, fp16 0.885, bf16 0.833; AUROC 0.931, 0.932, 0.908. The bounds (6 points of
// accuracy, 0.04 AUROC) allow for 400 validation images (one image is 0.25 points); the
// issue's 1-point comparison needs the full default job. fp32 writes no scaler fields.
TEST_F(AmpTraining, LowPrecisionTrainsLikeFp32) {
  auto job = [&](const std::string& precision) {
    Json c = default_config();
    for (const char* s : {"model.widths=[8, 16, 32, 64]", "model.depths=[1, 1, 1, 1]", "model.head_hidden=32",
                          "model.dropout=[0.0, 0.0]", "data.image_size=64", "data.synth.train=2000",
                          "data.synth.val=400", "data.synth.size=64", "train.epochs=6", "train.batch_size=32",
                          "train.threads=2", "optim.lr=3e-3", "schedule.name=cosine"})
      apply_override(c, s);
    apply_override(c, "train.precision=" + precision);
    apply_override(c, "train.out=" + std::string(tmp_ / precision));
    return c;
  };
  auto auroc = [](const EvalResult& e) {
    return classification_report(e.probs, e.labels, 2, {"normal", "opacity"}).auroc;
  };
  std::string log;
  const TrainSummary fp32 = train(job("fp32"), &log);
  EXPECT_EQ(log.find("loss scale"), std::string::npos);
  EXPECT_FALSE(jsonl(tmp_ / "fp32/steps.jsonl").front().contains("loss_scale"));
  EXPECT_FALSE(jsonl(tmp_ / "fp32/metrics.jsonl").front().contains("loss_scale"));
  EXPECT_GT(fp32.final_eval.cm.accuracy(), 0.8) << log;
  for (const std::string precision : {"fp16", "bf16"}) {
    const TrainSummary got = train(job(precision), &log);
    EXPECT_NEAR(got.final_eval.cm.accuracy(), fp32.final_eval.cm.accuracy(), 0.06) << precision << "\n" << log;
    EXPECT_NEAR(auroc(got.final_eval), auroc(fp32.final_eval), 0.04) << precision;
    EXPECT_EQ(log.find("loss scale") != std::string::npos, precision == "fp16") << precision;
  }
}
