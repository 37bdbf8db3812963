// Data-parallel training end to end: `mpirun -np 2 lancet train` against single-process runs
// (same global batch), resuming with another rank count, and the failure handling (a rank
// killed, hung or failing; mismatched configurations). Skips where the build has no MPI.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <utility>
#include <vector>

#include "tests/cli_util.h"
#include "tests/weights_diff.h"
#include "trainer/weights.h"

using namespace lancet;
using namespace lancet::testing;
namespace fs = std::filesystem;

namespace {

const std::string kMpiexec = LANCET_MPIEXEC;

struct Timed {
  RunResult r;
  double seconds = 0;
};

// `mpirun -np N lancet ARGS` (or, with ranks 0, plain `lancet ARGS`), environment `env`.
Timed run(int ranks, const std::string& env, const std::string& args) {
  const auto t0 = std::chrono::steady_clock::now();
  Timed t;
  if (ranks == 0) {
    t.r = run_lancet_env(env, args);
  } else {
    // mpirun passes its environment on to the ranks it starts on this node.
    const std::string mpi = kMpiexec + " --allow-run-as-root --oversubscribe -np " + std::to_string(ranks) + " ";
    t.r = run_command((env.empty() ? "" : "env " + env + " ") + mpi + lancet_binary() + " " + args);
  }
  t.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return t;
}

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t pos = 0; (pos = text.find(what, pos)) != std::string::npos; pos += what.size()) ++n;
  return n;
}

class Ddp : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kMpiexec.empty()) GTEST_SKIP() << "this build has no MPI (libopenmpi-dev) or no mpirun";
  }
  TempDir dir{"ddp"};
  // A small MedicalCNN, 8 steps of SGD (256 images, global batch 32), no dropout.
  std::string args(const std::string& out, const std::string& extra = "") const {
    return "train --set model.widths=[8,16,16,16] --set model.depths=[1,1,1,1] --set model.head_hidden=16 "
           "--set model.dropout=[0.0,0.0] --set data.image_size=32 --set data.synth.size=32 "
           "--set data.synth.train=256 --set data.synth.val=64 --set train.epochs=1 --set train.batch_size=32 "
           "--set optim.name=sgd --set optim.lr=0.05 --set train.tensorboard=false --set train.threads=1 --out " +
           out + " " + extra;
  }
  std::string env() const { return "LANCET_CACHE=" + dir / "cache"; }
};

}  // namespace

TEST_F(Ddp, TwoRanksWithSyncBatchNormTrainLikeOneProcess) {
  const Timed one = run(0, env(), args(dir / "one"));
  ASSERT_EQ(one.r.status, 0) << one.r.output;
  const Timed two = run(2, env(), args(dir / "two", "--set dist.sync_bn=true --set dist.bucket_mb=0.01"));
  ASSERT_EQ(two.r.status, 0) << two.r.output;
  // Only rank 0 talks and writes.
  EXPECT_EQ(count(two.r.output, "config:"), 1) << two.r.output;
  EXPECT_NE(two.r.output.find("batch 32 (2 ranks x 16)"), std::string::npos) << two.r.output;
  EXPECT_NE(two.r.output.find("all-reduced during the backward, SyncBatchNorm"), std::string::npos) << two.r.output;
  // Every rank ended with rank 0's weights, bit for bit (checked before final.h5 is written).
  EXPECT_EQ(count(two.r.output, "parameters identical on all 2 ranks (checksum "), 1) << two.r.output;
  ASSERT_TRUE(fs::exists(dir / "two/final.h5"));
  // Same samples per step, global BatchNorm statistics, averaged gradients: the same weights
  // up to float summation order.
  EXPECT_LT(max_difference(dir / "one/final.h5", dir / "two/final.h5"), 2e-5);

  // Gradient accumulation: 2 ranks x 2 micro-batches equal 1 process x 2 micro-batches (each
  // micro-batch's SyncBatchNorm statistics span the same samples).
  const Timed one_acc = run(0, env(), args(dir / "one_acc", "--set train.grad_accum_steps=2"));
  ASSERT_EQ(one_acc.r.status, 0) << one_acc.r.output;
  const Timed two_acc = run(2, env(), args(dir / "two_acc", "--set dist.sync_bn=true --set train.grad_accum_steps=2"));
  ASSERT_EQ(two_acc.r.status, 0) << two_acc.r.output;
  EXPECT_LT(max_difference(dir / "one_acc/final.h5", dir / "two_acc/final.h5"), 2e-5);
  EXPECT_GT(max_difference(dir / "one/final.h5", dir / "one_acc/final.h5"), 1e-6);  // BatchNorm saw other batches

  // Per-rank BatchNorm (the default) trains too, and differs.
  const Timed plain = run(2, env(), args(dir / "plain"));
  ASSERT_EQ(plain.r.status, 0) << plain.r.output;
  EXPECT_NE(plain.r.output.find("per-rank BatchNorm statistics"), std::string::npos);
  EXPECT_NE(plain.r.output.find("parameters identical on all 2 ranks"), std::string::npos) << plain.r.output;
  EXPECT_GT(max_difference(dir / "one/final.h5", dir / "plain/final.h5"), 1e-5);

  // A checkpoint of the 2-rank run resumes in one process and ends where the 1-process run did.
  const Timed part = run(2, env(), args(dir / "resume", "--set dist.sync_bn=true --set train.max_steps=4 --set train.checkpoint_every=2"));
  ASSERT_EQ(part.r.status, 0) << part.r.output;
  const Timed rest = run(0, env(), args(dir / "resume", "--resume auto"));
  ASSERT_EQ(rest.r.status, 0) << rest.r.output;
  EXPECT_NE(rest.r.output.find("at epoch 1, step 4"), std::string::npos) << rest.r.output;
  EXPECT_LT(max_difference(dir / "one/final.h5", dir / "resume/final.h5"), 2e-5);
}

TEST_F(Ddp, ABadBatchOrAMismatchedRankIsReportedWithBothValues) {
  const Timed odd = run(2, env(), args(dir / "odd", "--set train.batch_size=33"));
  EXPECT_NE(odd.r.status, 0);
  EXPECT_NE(odd.r.output.find("train.batch_size 33 is the global batch and must be a multiple of the 2 ranks"),
            std::string::npos)
      << odd.r.output;
  // MPMD: rank 1 is started with another batch size.
  const std::string mpmd = "--set train.max_steps=1 --set train.batch_size=32 : --allow-run-as-root --oversubscribe -np 1 " +
                           lancet_binary() + " " + args(dir / "mismatch", "--set train.max_steps=1 --set train.batch_size=64");
  const Timed mismatch = run(1, env(), args(dir / "mismatch", mpmd));
  EXPECT_NE(mismatch.r.status, 0);
  EXPECT_NE(mismatch.r.output.find("the ranks disagree on train.batch_size: rank 0 has 32, rank 1 has 64"),
            std::string::npos)
      << mismatch.r.output;
  EXPECT_LT(mismatch.seconds, 60);
  // Settings outside the old list of compared fields: every setting is compared now. Before,
  // a different clip norm trained apart silently (exit 0) and a different drop_last crashed
  // rank 1 inside MPI_Testall with no lancet message.
  for (const auto& [setting, message] :
       std::vector<std::pair<std::string, std::string>>{
           {"train.clip_grad_norm=0.01", "the ranks disagree on train.clip_grad_norm: rank 0 has 0, rank 1 has 0.01"},
           {"train.drop_last=true", "the ranks disagree on train.drop_last: rank 0 has false, rank 1 has true"}}) {
    const std::string out = dir / "mpmd";
    const std::string job = "--set train.max_steps=2 : --allow-run-as-root --oversubscribe -np 1 " + lancet_binary() +
                            " " + args(out, "--set train.max_steps=2 --set " + setting);
    const Timed t = run(1, env(), args(out, job));
    EXPECT_NE(t.r.status, 0) << setting << "\n" << t.r.output;
    EXPECT_NE(t.r.output.find(message), std::string::npos) << t.r.output;
    EXPECT_LT(t.seconds, 60) << setting;
    EXPECT_FALSE(fs::exists(out + "/final.h5")) << setting;
  }
  // A setting each rank may choose for itself (its thread and loader-worker counts) is not a mismatch.
  const std::string own = dir / "own";
  const Timed per_rank = run(1, env(), args(own, "--set train.max_steps=2 --set data.workers=0 : --allow-run-as-root --oversubscribe -np 1 " +
                                                     lancet_binary() + " " +
                                                     args(own, "--set train.max_steps=2 --set data.workers=1 --set train.threads=2")));
  EXPECT_EQ(per_rank.r.status, 0) << per_rank.r.output;
  EXPECT_NE(per_rank.r.output.find("parameters identical on all 2 ranks"), std::string::npos) << per_rank.r.output;
}

// An uneven dataset (238 images, 3 ranks): padded (DistributedSampler's default: 80 per rank,
// two images twice, 8 steps of 3 x 10) or, with dist.sampler_drop_last, dropped (79 per rank,
// one image left out; train.drop_last then drops each rank's last 9: 7 steps). That no image
// repeats within an epoch is checked on the ranks' gathered indices in
// GradSync.EpochSplitOverTheRanksPadsOrDrops (gradsync.mpi.np3).
TEST_F(Ddp, ThreeRanksPadOrDropAnUnevenDataset) {
  const std::string uneven = "--set data.synth.train=238 --set train.batch_size=30 --set train.drop_last=true";
  const Timed pad = run(3, env(), args(dir / "pad", uneven));
  ASSERT_EQ(pad.r.status, 0) << pad.r.output;
  EXPECT_NE(pad.r.output.find("training: 8 steps, batch 30 (3 ranks x 10)"), std::string::npos) << pad.r.output;
  EXPECT_NE(pad.r.output.find("epoch split: 238 samples over 3 ranks, 80 per rank (2 repeated to pad"), std::string::npos)
      << pad.r.output;
  EXPECT_NE(pad.r.output.find("parameters identical on all 3 ranks"), std::string::npos) << pad.r.output;
  const Timed drop = run(3, env(), args(dir / "drop", uneven + " --set dist.sampler_drop_last=true"));
  ASSERT_EQ(drop.r.status, 0) << drop.r.output;
  EXPECT_NE(drop.r.output.find("training: 7 steps, batch 30 (3 ranks x 10)"), std::string::npos) << drop.r.output;
  EXPECT_NE(drop.r.output.find("epoch split: 238 samples over 3 ranks, 79 per rank (1 dropped: dist.sampler_drop_last)"),
            std::string::npos)
      << drop.r.output;
  EXPECT_NE(drop.r.output.find("parameters identical on all 3 ranks"), std::string::npos) << drop.r.output;
  // The steps logged: 7 of 30 images.
  std::ifstream steps(dir / "drop/steps.jsonl");
  int lines = 0;
  for (std::string line; std::getline(steps, line);) ++lines;
  EXPECT_EQ(lines, 7);
}

TEST_F(Ddp, ARankThatDiesHangsOrFailsEndsTheJobWithAMessage) {
  // Killed (SIGKILL, as the OOM killer would): the launcher ends the job.
  const Timed killed = run(2, env() + " LANCET_FAULT=1:2:kill", args(dir / "killed"));
  EXPECT_NE(killed.r.status, 0) << killed.r.output;
  EXPECT_NE(killed.r.output.find("signal 9"), std::string::npos) << killed.r.output;  // mpirun saw the kill
  EXPECT_LT(killed.seconds, 60) << killed.r.output;
  // Hung: rank 0 gives up after dist.timeout_s and aborts the job.
  const Timed hung = run(2, env() + " LANCET_FAULT=1:2:hang", args(dir / "hung", "--set dist.timeout_s=2"));
  EXPECT_NE(hung.r.status, 0) << hung.r.output;
  EXPECT_NE(hung.r.output.find("no answer from the other ranks for 2"), std::string::npos)
      << hung.r.output;
  EXPECT_LT(hung.seconds, 60) << hung.r.output;
  // Failing with an error: that rank reports it and aborts the job at once.
  const Timed failed = run(2, env() + " LANCET_FAULT=1:2:error", args(dir / "failed"));
  EXPECT_NE(failed.r.status, 0) << failed.r.output;
  EXPECT_NE(failed.r.output.find("lancet train: error: rank 1 of 2: LANCET_FAULT: injected error after step 2"),
            std::string::npos)
      << failed.r.output;
  EXPECT_LT(failed.seconds, 60) << failed.r.output;
  // Drifting silently (one weight of rank 1 nudged after step 2): trained to the end, then
  // caught by the cross-rank parameter check before final.h5.
  const Timed drifted = run(2, env() + " LANCET_FAULT=1:2:perturb", args(dir / "drifted"));
  EXPECT_NE(drifted.r.status, 0) << drifted.r.output;
  EXPECT_NE(drifted.r.output.find("rank 1's parameters differ from rank 0's after training: 1 of "), std::string::npos)
      << drifted.r.output;
  EXPECT_EQ(drifted.r.output.find("parameters identical"), std::string::npos) << drifted.r.output;
  // Nothing half-written: rank 0 wrote no final weights in any of them.
  for (const char* d : {"killed", "hung", "failed", "drifted"})
    EXPECT_FALSE(fs::exists(dir / (std::string(d) + "/final.h5"))) << d;
}
