// Checkpoints and resume: a run stopped after step k and resumed ends bitwise identical to an
// uninterrupted one; incompatible, damaged and weights-only files are refused with a message
// naming the file and the mismatch; only the newest K checkpoints are kept.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "comm/communicator.h"
#include "data/h5file.h"
#include "tests/expect_error.h"
#include "trainer/checkpoint.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;
namespace fs = std::filesystem;

namespace {

Json small_job(const std::string& out, const std::string& optimizer = "adam") {
  Json c = default_config();
  for (const char* s : {"model.widths=[8, 16, 32, 64]", "model.depths=[1, 1, 1, 1]", "model.head_hidden=32",
                        "data.image_size=32", "data.synth.train=200", "data.synth.val=64", "data.synth.size=32",
                        "train.epochs=3", "train.batch_size=32", "train.threads=2", "train.checkpoint_every=3"})
    apply_override(c, s);
  apply_override(c, "optim.name=" + optimizer);
  // Schedule state, early-stopping state and clipping must survive a resume too.
  if (optimizer == "adam") {
    apply_override(c, "schedule.name=cosine");
    apply_override(c, "schedule.warmup_steps=4");
  } else {
    apply_override(c, "schedule.name=plateau");
    apply_override(c, "schedule.patience=0");
    apply_override(c, "schedule.monitor=train_loss");
  }
  apply_override(c, "train.clip_grad_norm=0.5");
  apply_override(c, "early_stopping.patience=5");
  apply_override(c, "train.out=" + out);
  return c;
}

TrainSummary train(const Json& c, std::string* log_text = nullptr) {
  auto comm = make_single_process_communicator();
  std::ostringstream log;
  TrainSummary s = run_training(c, *comm, log);
  if (log_text) *log_text = log.str();
  return s;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

size_t count_lines(const std::string& path) {
  const std::string text = read_text(path);
  return static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
}

void expect_same_weights(const std::string& a, const std::string& b) {
  H5File fa = H5File::open_read(a), fb = H5File::open_read(b);
  const auto names = fa.list("/model");
  ASSERT_EQ(names, fb.list("/model"));
  for (const auto& n : names) EXPECT_EQ(fa.read("/model/" + n).to_vector(), fb.read("/model/" + n).to_vector()) << n;
}

// Metrics lines without the wall-clock fields (times, throughput, the step-phase profile) and
// the memory peak.
std::vector<std::string> metrics_lines(const std::string& path) {
  std::vector<std::string> out;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);) {
    Json j = Json::parse(line);
    j.erase("epoch_seconds");
    j.erase("images_per_s");
    j.erase("phases");
    j.erase("peak_bytes");  // prefetched batches in the loader queue vary with timing
    out.push_back(j.dump());
  }
  return out;
}

class Checkpoints : public ::testing::Test {
 protected:
  void SetUp() override { setenv("LANCET_CACHE", (tmp_ / "cache").c_str(), 1); }
  TempDir tmp_{"ckpt"};
};

}  // namespace

TEST_F(Checkpoints, ResumedRunIsBitwiseIdentical) {
  for (const std::string opt : {"adam", "sgd"}) {
    SCOPED_TRACE(opt);
    const std::string full = tmp_ / ("full_" + opt), part = tmp_ / ("part_" + opt);
    const TrainSummary want = train(small_job(full, opt));
    for (int64_t stop : {5, 7, 11}) {  // mid-epoch (no checkpoint at 5: resumes from 3), at an epoch end, mid-epoch
      SCOPED_TRACE("stopped after step " + std::to_string(stop));
      fs::remove_all(part);
      Json first = small_job(part, opt);
      apply_override(first, "train.max_steps=" + std::to_string(stop));
      train(first);
      Json second = small_job(part, opt);
      apply_override(second, "train.resume=auto");
      const TrainSummary got = train(second);
      EXPECT_EQ(got.steps, want.steps);
      expect_same_weights(full + "/final.h5", part + "/final.h5");
      EXPECT_EQ(metrics_lines(full + "/metrics.jsonl"), metrics_lines(part + "/metrics.jsonl"));
      EXPECT_EQ(got.final_eval.loss, want.final_eval.loss);
    }
  }
}

// A resumed run's checkpoints resume too: stopped twice, the run still ends on the weights of one
// never stopped (a resumed run once wrote its dropout counters twice, so the second resume
// failed on "damaged training state").
TEST_F(Checkpoints, ResumedTwiceIsBitwiseIdentical) {
  const std::string full = tmp_ / "full", part = tmp_ / "part";
  train(small_job(full));
  for (const std::string stop : {"7", "14", ""}) {
    Json c = small_job(part);
    if (!stop.empty()) apply_override(c, "train.max_steps=" + stop);
    if (stop != "7") apply_override(c, "train.resume=auto");
    train(c);
  }
  expect_same_weights(full + "/final.h5", part + "/final.h5");
  EXPECT_EQ(metrics_lines(full + "/metrics.jsonl"), metrics_lines(part + "/metrics.jsonl"));
}

TEST_F(Checkpoints, KeepsTheNewestAndLoadsAsWeights) {
  Json c = small_job(tmp_ / "run");
  apply_override(c, "train.keep_checkpoints=2");
  train(c);
  const auto files = list_checkpoints(tmp_ / "run");
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(fs::path(files.back()).filename(), "step-000000021.h5");  // 3 epochs x 7 steps
  // A checkpoint is an interchange weights file too, equal to final.h5 at the end.
  auto model = load_model(files.back());
  expect_same_weights(files.back(), tmp_ / "run/final.h5");
}

TEST_F(Checkpoints, RefusesIncompatibleDamagedAndWeightsOnlyFiles) {
  const std::string run = tmp_ / "run";
  Json c = small_job(run);
  apply_override(c, "train.max_steps=4");
  train(c);
  const std::string ckpt = run + "/checkpoints/step-000000003.h5";
  ASSERT_TRUE(fs::exists(ckpt));

  Json other = small_job(run);
  apply_override(other, "train.batch_size=16");
  apply_override(other, "train.resume=" + ckpt);
  expect_error([&] { train(other); }, {ckpt, "train.batch_size", "32", "16"});

  other = small_job(run);
  apply_override(other, "model.widths=[8, 16, 32, 48]");
  apply_override(other, "train.resume=" + ckpt);
  expect_error([&] { train(other); }, {ckpt, "cannot resume", "model"});

  other = small_job(run, "sgd");
  apply_override(other, "train.resume=" + ckpt);
  expect_error([&] { train(other); }, {ckpt, "optim.name"});

  // A weights-only file cannot resume a run.
  other = small_job(run);
  apply_override(other, "train.resume=" + run + "/final.h5");
  expect_error([&] { train(other); }, {run + "/final.h5", "not a training checkpoint"});

  // A damaged newest checkpoint: an explicit resume names it; auto skips to the previous one.
  const std::string newest = run + "/checkpoints/step-000000004.h5";
  ASSERT_TRUE(fs::exists(newest));
  fs::resize_file(newest, fs::file_size(newest) / 2);
  other = small_job(run);
  apply_override(other, "train.resume=" + newest);
  expect_error([&] { train(other); }, {newest});
  std::ostringstream log;
  EXPECT_EQ(newest_valid_checkpoint(run, log), ckpt);
  EXPECT_NE(log.str().find("skipping checkpoint " + newest), std::string::npos) << log.str();

  // A fresh run into a folder holding another run's checkpoints is refused (nothing deleted).
  other = small_job(run);
  expect_error([&] { train(other); }, {run + "/checkpoints holds", "--resume auto"});
  EXPECT_TRUE(fs::exists(ckpt));

  // resume=auto with nothing to resume starts fresh; without a run folder it is an error.
  other = small_job(tmp_ / "fresh");
  apply_override(other, "train.resume=auto");
  apply_override(other, "train.epochs=1");
  EXPECT_EQ(train(other).steps, 7);
  other = small_job("");
  apply_override(other, "train.resume=auto");
  expect_error([&] { train(other); }, {"train.resume=auto", "--out"});
}

TEST_F(Checkpoints, CliResumeFlag) {
  const std::string run = tmp_ / "cli";
  const std::string common = "--set model.widths=[8,16,32,64] --set model.depths=[1,1,1,1] --set model.head_hidden=32 "
                             "--image-size 32 --set data.synth.train=100 --set data.synth.val=32 "
                             "--set data.synth.size=32 --epochs 2 --threads 1 --out " + run;
  const std::string env = "LANCET_CACHE=" + tmp_ / "cache";
  RunResult r = run_lancet_env(env, "train " + common + " --max-steps 4");
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_lancet_env(env, "train " + common + " --resume auto");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from " + run + "/checkpoints/step-000000004.h5 at epoch 2, step 4"),
            std::string::npos)
      << r.output;
}

// The real thing: SIGKILL the process somewhere after its first checkpoints, resume with
// --resume auto, and end with the same weights as a run that was never interrupted.
TEST_F(Checkpoints, KilledRunResumesToTheSameWeights) {
  const std::string common = "--set model.widths=[8,16,32,64] --set model.depths=[1,1,1,1] --set model.head_hidden=32 "
                             "--image-size 64 --set data.synth.train=400 --set data.synth.val=32 "
                             "--set data.synth.size=64 --epochs 2 --threads 1 --set train.checkpoint_every=2";
  const std::string env = "LANCET_CACHE=" + tmp_ / "cache";
  RunResult r = run_lancet_env(env, "train " + common + " --out " + tmp_ / "full");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string part = tmp_ / "part";
  const std::string script = "env " + env + " " + lancet_binary() + " train " + common + " --out " + part +
                             " >/dev/null 2>&1 & pid=$!; "
                             "while [ ! -e " + part + "/checkpoints/step-000000006.h5 ]; do "
                             "  kill -0 $pid 2>/dev/null || exit 3; sleep 0.005; done; "
                             "kill -9 $pid; wait $pid; echo status $?";
  FILE* p = popen(("bash -c '" + script + "'").c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[256] = {0};
  const size_t got = fread(buf, 1, sizeof(buf) - 1, p);
  const int st = pclose(p);
  ASSERT_EQ(WEXITSTATUS(st), 0) << "the run ended before it could be killed: " << std::string(buf, got);
  EXPECT_NE(std::string(buf, got).find("status 137"), std::string::npos) << std::string(buf, got);
  EXPECT_FALSE(fs::exists(part + "/final.h5"));
  r = run_lancet_env(env, "train " + common + " --out " + part + " --resume auto");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  expect_same_weights(tmp_ / "full/final.h5", part + "/final.h5");
  EXPECT_EQ(metrics_lines(tmp_ / "full/metrics.jsonl"), metrics_lines(part + "/metrics.jsonl"));
}

// A run that ended is not trained further by a resume: one stopped early (killed after its last
// checkpoint but before final.h5, or finished) and one that ran all its epochs. The resumed run
// ends where the run did: same steps, same final weights, no new epochs.csv / metrics /
// steps rows, "nothing left to train" in the log. (A resume once started the stopped run's next
// epoch: the stop decision was not restored.) Early stopping here watches val_auroc.
TEST_F(Checkpoints, ResumingAnEndedRunTrainsNoFurther) {
  const std::string run = tmp_ / "stopped";
  Json c = small_job(run);
  for (const std::string s : {"train.epochs=4", "early_stopping.monitor=val_auroc", "early_stopping.mode=max",
                              "early_stopping.patience=1", "early_stopping.min_delta=100"})
    apply_override(c, s);
  std::string log;
  const TrainSummary first = train(c, &log);
  // Epoch 1 sets the best AUROC; epoch 2 cannot beat it by 100: patience 1 stops there.
  ASSERT_TRUE(first.stopped_early) << log;
  ASSERT_EQ(first.steps, 2 * 7);
  EXPECT_NE(log.find("new best val_auroc"), std::string::npos) << log;
  EXPECT_NE(log.find("early stopping: val_auroc has not improved for 1 epochs"), std::string::npos) << log;
  fs::copy_file(run + "/final.h5", tmp_ / "stopped_final.h5");
  const std::string epochs_csv = read_text(run + "/epochs.csv");
  const auto metrics = metrics_lines(run + "/metrics.jsonl");
  ASSERT_EQ(count_lines(run + "/steps.jsonl"), 14u);
  ASSERT_EQ(fs::path(list_checkpoints(run).back()).filename(), "step-000000014.h5");

  Json again = c;
  apply_override(again, "train.resume=auto");
  for (const bool killed_before_final : {true, false}) {
    SCOPED_TRACE(killed_before_final ? "killed before final.h5" : "finished");
    if (killed_before_final) fs::remove(run + "/final.h5");
    const TrainSummary got = train(again, &log);
    EXPECT_EQ(got.steps, first.steps);
    EXPECT_TRUE(got.stopped_early);
    EXPECT_NE(log.find("resume: early stopping ended this run after epoch 2 (val_auroc had not improved for 1 "
                       "epochs); nothing left to train"),
              std::string::npos)
        << log;
    expect_same_weights(tmp_ / "stopped_final.h5", run + "/final.h5");
    EXPECT_EQ(read_text(run + "/epochs.csv"), epochs_csv);
    EXPECT_EQ(metrics_lines(run + "/metrics.jsonl"), metrics);
    EXPECT_EQ(count_lines(run + "/steps.jsonl"), 14u);
    EXPECT_EQ(fs::path(list_checkpoints(run).back()).filename(), "step-000000014.h5");
    EXPECT_EQ(got.final_eval.loss, first.final_eval.loss);
  }

  // All epochs done: the same, and the same as it was before (no training, final.h5 rewritten
  // with the run's last weights).
  const std::string full = tmp_ / "full";
  Json done = small_job(full);
  const TrainSummary ran = train(done);
  ASSERT_EQ(ran.steps, 21);
  fs::copy_file(full + "/final.h5", tmp_ / "full_final.h5");
  const auto full_metrics = metrics_lines(full + "/metrics.jsonl");
  apply_override(done, "train.resume=auto");
  const TrainSummary got = train(done, &log);
  EXPECT_EQ(got.steps, 21);
  EXPECT_FALSE(got.stopped_early);
  EXPECT_NE(log.find("resume: the run's 21 steps are done; nothing left to train"), std::string::npos) << log;
  expect_same_weights(tmp_ / "full_final.h5", full + "/final.h5");
  EXPECT_EQ(metrics_lines(full + "/metrics.jsonl"), full_metrics);
  EXPECT_EQ(count_lines(full + "/steps.jsonl"), 21u);
  EXPECT_EQ(got.final_eval.loss, ran.final_eval.loss);
}

namespace lancet {
namespace {

TEST(CheckpointTempFiles, OnlyADeadWritersFilesAreRemoved) {
  testing::TempDir dir("ckpt_tmp");
  const std::string out = dir.path.string();
  std::filesystem::create_directories(checkpoint_dir(out));
  const pid_t child = fork();  // a process that is gone by the time we look
  ASSERT_GE(child, 0);
  if (child == 0) _exit(0);
  int status = 0;
  waitpid(child, &status, 0);
  const std::string dead = std::to_string(child), alive = std::to_string(getpid());
  const std::vector<std::string> stale{checkpoint_dir(out) + "/step-000000006.h5.tmp-" + dead + "-0",
                                       out + "/final.h5.tmp-" + dead + "-3"};
  const std::vector<std::string> kept{checkpoint_dir(out) + "/step-000000008.h5.tmp-" + alive + "-1",  // a live writer
                                      out + "/notes.h5.tmp-x-1", checkpoint_dir(out) + "/step-000000004.h5"};
  for (const auto& f : stale) std::ofstream(f) << "partial";
  for (const auto& f : kept) std::ofstream(f) << "keep";
  auto removed = remove_stale_temp_files(out);
  std::sort(removed.begin(), removed.end());
  auto want = stale;
  std::sort(want.begin(), want.end());
  EXPECT_EQ(removed, want);
  for (const auto& f : stale) EXPECT_FALSE(std::filesystem::exists(f)) << f;
  for (const auto& f : kept) EXPECT_TRUE(std::filesystem::exists(f)) << f;
  EXPECT_TRUE(remove_stale_temp_files(out).empty());
  EXPECT_TRUE(remove_stale_temp_files(out + "/does-not-exist").empty());
}

}  // namespace
}  // namespace lancet
