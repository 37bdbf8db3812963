// The training loop end to end on a small job: the run folder holds metrics.jsonl and
// final.h5, the saved weights reproduce the reported validation figures when loaded again,
// the same seed gives the same weights, and CLI errors are one clear line. (Learning to a
// stated accuracy is test_slow_default_job.cpp.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "comm/communicator.h"
#include "data/image_folder.h"
#include "data/h5file.h"
#include "trainer/schedule.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;

namespace {
// A small job for the run-folder and determinism checks (learning itself is checked on the
// real default job, test_slow_default_job.cpp).
Json small_job(const std::string& out) {
  Json c = default_config();
  apply_override(c, "model.widths=[8, 16, 32, 64]");
  apply_override(c, "model.depths=[1, 1, 1, 1]");
  apply_override(c, "model.head_hidden=32");
  apply_override(c, "data.image_size=32");
  apply_override(c, "data.synth.train=200");
  apply_override(c, "data.synth.val=64");
  apply_override(c, "data.synth.size=32");
  apply_override(c, "train.epochs=2");
  apply_override(c, "train.batch_size=32");
  apply_override(c, "train.threads=2");
  apply_override(c, "train.out=" + out);
  return c;
}

}  // namespace

TEST(Training, RunFolderHoldsMetricsAndWeights) {
  TempDir tmp("train");
  setenv("LANCET_CACHE", (tmp / "cache").c_str(), 1);
  const Json config = small_job(tmp / "run");
  auto comm = make_single_process_communicator();
  std::ostringstream log;
  const TrainSummary s = run_training(config, *comm, log);
  SCOPED_TRACE(log.str());
  EXPECT_EQ(s.steps, 2 * 7);

  // One metrics line per epoch, and weights that reproduce the final accuracy.
  std::ifstream m(tmp / "run/metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(m, line); ++lines) {
    const Json j = Json::parse(line);
    EXPECT_EQ(j["epoch"].get<int>(), lines + 1);
    EXPECT_TRUE(j["val"].contains("recall"));
  }
  EXPECT_EQ(lines, 2);
  auto model = load_model(tmp / "run/final.h5");
  DataConfig dc = data_config(config);
  DataSplits data = load_data(dc, log);
  const EvalResult again = evaluate(*model, *data.val, 64, Loss{}, Stream::cpu());
  EXPECT_DOUBLE_EQ(again.cm.accuracy(), s.final_eval.cm.accuracy());
  EXPECT_DOUBLE_EQ(again.loss, s.final_eval.loss);

  // `lancet eval` on the same split: the same figures in its JSON report, one CSV row per
  // sample; with --precision fp16 (emulated here) nearly the same loss, and the report says so.
  const std::string flags = "--batch-size 64 --image-size 32 --set data.synth.train=200 --set data.synth.val=64 --set data.synth.size=32";
  const std::string env = "LANCET_CACHE=" + (tmp / "cache");
  RunResult r = run_lancet_env(env, "eval --weights " + (tmp / "run/final.h5") + " " + flags + " --report " +
                                        (tmp / "r.json") + " --predictions " + (tmp / "p.csv"));
  ASSERT_EQ(r.status, 0) << r.output;
  Json report = Json::parse(std::ifstream(tmp / "r.json"));
  EXPECT_DOUBLE_EQ(report["loss"].get<double>(), s.final_eval.loss);
  EXPECT_DOUBLE_EQ(report["accuracy"].get<double>(), s.final_eval.cm.accuracy());
  EXPECT_EQ(report["compute"]["precision"], "fp32");
  std::ifstream csv(tmp / "p.csv");
  int rows = 0;
  for (std::string line; std::getline(csv, line);) ++rows;
  EXPECT_EQ(rows, 1 + 64);
  r = run_lancet_env(env, "eval --weights " + (tmp / "run/final.h5") + " " + flags + " --precision fp16 --report " +
                              (tmp / "r16.json"));
  ASSERT_EQ(r.status, 0) << r.output;
  report = Json::parse(std::ifstream(tmp / "r16.json"));
  EXPECT_EQ(report["compute"]["precision"], "fp16");
  EXPECT_NEAR(report["loss"].get<double>(), s.final_eval.loss, 0.01 * s.final_eval.loss + 1e-3);
  EXPECT_NE(report["loss"].get<double>(), s.final_eval.loss);  // it really ran in (emulated) fp16
}

TEST(Training, SameSeedSameWeights) {
  TempDir tmp("train_det");
  setenv("LANCET_CACHE", (tmp / "cache").c_str(), 1);
  auto run = [&](const std::string& out) {
    Json c = small_job(tmp / ("runs/" + out));
    apply_override(c, "train.epochs=1");
    apply_override(c, "train.max_steps=5");
    auto comm = make_single_process_communicator();
    std::ostringstream log;
    run_training(c, *comm, log);
    return load_model(tmp / ("runs/" + out + "/final.h5"));
  };
  auto a = run("a"), b = run("b");
  auto sa = a->state_dict(), sb = b->state_dict();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) EXPECT_EQ(sa[i].second->to_vector(), sb[i].second->to_vector()) << sa[i].first;
}

TEST(Training, CliDefaultsAndErrors) {
  // A bad setting is one clear line and a non-zero exit, before any work starts.
  RunResult r = run_lancet("train --set train.batchsize=3");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("unknown setting 'train.batchsize'"), std::string::npos) << r.output;
  r = run_lancet("train --data /nonexistent/folder --epochs 1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("/nonexistent/folder"), std::string::npos) << r.output;
  r = run_lancet("--version");
  EXPECT_EQ(r.status, 0);
  for (const char* part : {"lancet ", "CUDA", "cuDNN", "NCCL", "MPI", "OpenCV", "HDF5", "BLAS", "devices:"})
    EXPECT_NE(r.output.find(part), std::string::npos) << part << " missing from: " << r.output;
}

// The glaucoma study's controls and everything a run writes to show where time goes: a cosine
// schedule with warm-up, clipping, early stopping with the best model exported, per-step and
// per-epoch logs, TensorBoard events and a Chrome trace of phases and layers.
TEST(Training, ScheduleClippingEarlyStoppingLogsAndTrace) {
  TempDir tmp("features");
  setenv("LANCET_CACHE", (tmp / "cache").c_str(), 1);
  const std::string out = tmp / "run";
  Json c = small_job(out);
  for (const std::string s : {"train.epochs=4", "schedule.name=cosine", "schedule.warmup_steps=3",
                              "train.clip_grad_norm=1.0", "early_stopping.patience=1", "early_stopping.min_delta=100"})
    apply_override(c, s);
  apply_override(c, "train.profile=" + out + "/trace.json");
  auto comm = make_single_process_communicator();
  std::ostringstream log;
  const TrainSummary s = run_training(c, *comm, log);
  SCOPED_TRACE(log.str());
  // Epoch 1 sets the best val_loss; epoch 2 cannot beat it by 100: patience 1 stops there.
  EXPECT_TRUE(s.stopped_early);
  EXPECT_EQ(s.steps, 2 * 7);
  EXPECT_NE(log.str().find("early stopping: val_loss has not improved for 1 epochs (best"), std::string::npos);
  EXPECT_NE(log.str().find("data_wait"), std::string::npos) << "no step-phase table";

  // steps.jsonl: one line per step with the scheduled lr and the gradient norm before clipping.
  const LrSchedule schedule(c["schedule"], 0.001, 4 * 7);
  std::ifstream steps(out + "/steps.jsonl");
  int64_t n = 0;
  for (std::string line; std::getline(steps, line);) {
    const Json j = Json::parse(line);
    EXPECT_EQ(j["step"].get<int64_t>(), n + 1);
    EXPECT_FLOAT_EQ(j["lr"].get<float>(), schedule.lr_for_step(n)) << "step " << n + 1;
    EXPECT_GT(j["grad_norm"].get<double>(), 0.0);
    ++n;
  }
  EXPECT_EQ(n, 14);

  // epochs.csv: a header and one row per epoch; metrics.jsonl carries the clinical report and phases.
  std::ifstream csv(out + "/epochs.csv");
  std::string header, row;
  std::getline(csv, header);
  EXPECT_EQ(header.rfind("epoch,step,lr,train_loss", 0), 0u) << header;
  int rows = 0;
  while (std::getline(csv, row)) ++rows;
  EXPECT_EQ(rows, 2);
  std::ifstream metrics(out + "/metrics.jsonl");
  std::string first;
  std::getline(metrics, first);
  const Json m = Json::parse(first);
  EXPECT_TRUE(m["val"].contains("auroc"));
  EXPECT_TRUE(m["val"].contains("per_class"));
  EXPECT_TRUE(m["phases"]["phases"].contains("forward"));

  // best.h5 is the epoch-1 model as a full checkpoint; TensorBoard events exist.
  H5File best = H5File::open_read(out + "/best.h5");
  EXPECT_EQ(Json::parse(*best.get_attr("/train", "state"))["global_step"].get<int64_t>(), 7);
  auto best_model = load_model(out + "/best.h5");
  int events = 0;
  for (const auto& e : std::filesystem::directory_iterator(out + "/tensorboard"))
    events += e.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  EXPECT_EQ(events, 1);

  // The Chrome trace holds step phases and layer events.
  std::ifstream tf(out + "/trace.json");
  const Json trace = Json::parse(tf);
  bool phase_forward = false, conv_backward = false;
  for (const Json& e : trace["traceEvents"]) {
    EXPECT_EQ(e["ph"], "X");
    phase_forward |= e["cat"] == "phase" && e["name"] == "forward";
    conv_backward |= e["cat"] == "backward" && e["name"] == "Conv2d";
  }
  EXPECT_TRUE(phase_forward);
  EXPECT_TRUE(conv_backward);
}
