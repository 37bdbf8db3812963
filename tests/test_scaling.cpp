// The scaling model (trainer/scaling.h), GradSync's bucket timings, `lancet bench` under
// mpirun and `lancet sweep` end to end.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "cli_util.h"
#include "comm/communicator.h"
#include "layers/medicalcnn.h"
#include "trainer/ddp.h"
#include "trainer/scaling.h"
#include "trainer/trainer.h"
#include "trainer/weights.h"

namespace lancet {
namespace {

using testing::run_lancet;
using testing::TempDir;

TEST(ScalingModel, RingAndTreeCosts) {
  const Link l{"x", 2e-6, 1e9};
  EXPECT_EQ(ring_allreduce_s(1e6, 1, l), 0);
  // 2 (p-1) alpha + 2 (p-1)/p n / beta
  EXPECT_NEAR(ring_allreduce_s(1e6, 4, l), 6 * 2e-6 + 1.5 * 1e-3, 1e-12);
  EXPECT_NEAR(tree_allreduce_s(1e6, 4, l), 4 * 2e-6 + 2e-3, 1e-12);
  EXPECT_NEAR(tree_allreduce_s(1e6, 5, l), 6 * 2e-6 + 2e-3, 1e-12);  // ceil(log2 5) = 3
  Cluster c;
  c.ranks_per_node = 4;
  c.intra = l;
  c.inter = Link{"y", 10e-6, 1e8};
  // One node: the cheaper of ring and tree (small message: tree's fewer latency terms win
  // at large p, ring's bandwidth term at large n).
  EXPECT_NEAR(allreduce_s(1e6, 4, c), std::min(ring_allreduce_s(1e6, 4, l), tree_allreduce_s(1e6, 4, l)), 1e-15);
  // Two nodes of 4: reduce-scatter + all-gather inside (2 x (3 alpha + 3/4 n/beta)) and a
  // 2-rank all-reduce of n/4 across.
  const double inter = std::min(ring_allreduce_s(2.5e5, 2, c.inter), tree_allreduce_s(2.5e5, 2, c.inter));
  EXPECT_NEAR(allreduce_s(1e6, 8, c), 2 * (3 * 2e-6 + 0.75 * 1e-3) + inter, 1e-12);
  EXPECT_GT(allreduce_s(1e6, 8, c), allreduce_s(1e6, 4, c));
}

TEST(ScalingModel, OverlapHidesEarlyBucketsAndExposesLateOnes) {
  MeasuredStep m;
  m.per_rank_batch = 10;
  m.forward_s = 0.1;
  m.backward_s = 0.2;
  m.optimizer_s = 0.05;
  m.buckets = {{int64_t(1e6), 0.05}, {int64_t(1e6), 0.2}};
  Cluster c;
  c.ranks_per_node = 2;
  c.intra = Link{"x", 0, 1e8};  // 1e6 bytes over 2 ranks: ring 2*(1/2)*1e6/1e8 = 10 ms; tree 20 ms
  const Prediction one = predict_step(m, 1, c);
  EXPECT_NEAR(one.step_s, 0.35, 1e-12);
  EXPECT_NEAR(one.efficiency, 1, 1e-12);
  const Prediction two = predict_step(m, 2, c);
  // The first bucket (ready at 50 ms) is done long before the backward ends; the last one,
  // ready at the end, is fully exposed.
  EXPECT_NEAR(two.comm_s, 0.02, 1e-12);
  EXPECT_NEAR(two.exposed_s, 0.01, 1e-12);
  EXPECT_NEAR(two.step_s, 0.36, 1e-12);
  EXPECT_NEAR(two.images_per_s, 20 / 0.36, 1e-9);
  EXPECT_NEAR(two.efficiency, 0.35 / 0.36, 1e-12);
  // Without overlap everything waits for the backward's end.
  EXPECT_NEAR(predict_step(m, 2, c, 1, /*overlap=*/false).exposed_s, 0.02, 1e-12);
  // Contention stretches compute (and the ready times with it).
  EXPECT_NEAR(predict_step(m, 2, c, 2).step_s, 2 * 0.3 + 0.01 + 0.05, 1e-12);
  // Buckets queue on one channel: two buckets ready together finish one after the other.
  m.buckets = {{int64_t(1e6), 0.2}, {int64_t(1e6), 0.2}};
  EXPECT_NEAR(predict_step(m, 2, c).exposed_s, 0.02, 1e-12);
}

TEST(ScalingModel, FitRecoversAlphaAndBeta) {
  const Link truth{"t", 7e-6, 3e9};
  std::vector<std::pair<double, double>> pts;
  for (double n : {4e3, 64e3, 1e6, 16e6}) pts.emplace_back(n, ring_allreduce_s(n, 3, truth));
  const Link fit = fit_ring_link("fit", pts, 3);
  EXPECT_NEAR(fit.alpha_s, 7e-6, 1e-9);
  EXPECT_NEAR(fit.beta_Bps / 3e9, 1, 1e-6);
  EXPECT_THROW(fit_ring_link("f", {{1e3, 1e-3}}, 2), Error);
  EXPECT_THROW(fit_ring_link("f", pts, 1), Error);
}

TEST(ScalingModel, ParseLinkAndBenchJson) {
  const Link l = parse_link("--net-intra", "2.5:100");
  EXPECT_NEAR(l.alpha_s, 2.5e-6, 1e-15);
  EXPECT_NEAR(l.beta_Bps, 100e9, 1);
  for (const char* bad : {"", "3", "a:1", "1:0", "1:2x", "-1:5"}) {
    try {
      parse_link("--net-inter", bad);
      ADD_FAILURE() << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--net-inter"), std::string::npos) << e.what();
    }
  }
  const Json j = Json::parse(R"({"ranks":1,"per_rank_batch":8,
    "profile":{"phases":{"forward":{"mean_ms":10},"backward":{"mean_ms":20},"optimizer":{"mean_ms":5},
                         "other":{"mean_ms":1},"data_wait":{"mean_ms":0},"h2d":{"mean_ms":0},"grad_sync":{"mean_ms":0}}},
    "buckets":[{"bytes":400,"ready_ms":3,"start_ms":-1,"done_ms":-1}]})");
  const MeasuredStep m = MeasuredStep::from_bench_json(j);
  EXPECT_EQ(m.per_rank_batch, 8);
  EXPECT_NEAR(m.forward_s, 0.01, 1e-12);
  EXPECT_NEAR(m.backward_s, 0.02, 1e-12);
  EXPECT_NEAR(m.optimizer_s, 0.005, 1e-12);
  EXPECT_NEAR(m.other_s, 0.001, 1e-12);
  ASSERT_EQ(m.buckets.size(), 1u);
  EXPECT_EQ(m.buckets[0].bytes, 400);
  EXPECT_NEAR(m.buckets[0].ready_s, 0.003, 1e-12);
  EXPECT_THROW(MeasuredStep::from_bench_json(Json::object()), Error);
}

TEST(GradSyncTimings, EveryBucketGetsAReadyTimeWithinTheBackwardInOrder) {
  MedicalCNNConfig cfg;
  cfg.in_channels = 1;
  cfg.num_classes = 2;
  cfg.widths = {8, 16, 16, 16};
  cfg.depths = {1, 1, 1, 1};
  cfg.head_hidden = 16;
  cfg.dropout = {0, 0};
  auto model = make_model(cfg.to_json(), 1);
  model->train();
  auto comm = make_single_process_communicator();
  GradSync sync(*model, *comm, GradSyncOptions{0.002, true});  // small buckets: several of them
  ASSERT_GT(sync.num_buckets(), 2);
  const Stream s{Device::cpu(), nullptr};
  Tensor x = Tensor::zeros({2, 1, 32, 32});
  Tensor y = Tensor::from_labels({0, 1});
  auto opt = make_optimizer(OptimConfig{"sgd", 0.1f, 0, 0, 0.9f, 0.999f, 1e-8f, false}, model->named_parameters());
  const Loss loss = make_loss(LossConfig{}, 2, Device::cpu());
  StepProfiler prof;
  StepOptions so;
  so.grad_sync = &sync;
  prof.begin_step();
  train_step(*model, *opt, *comm, x, y, loss, s, so, &prof);
  prof.end_step();
  const double backward_s = prof.stats(Phase::backward).total_s;
  const auto& t = sync.timings();
  ASSERT_EQ(static_cast<int>(t.size()), sync.num_buckets());
  int64_t bytes = 0;
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_GE(t[i].ready_s, 0) << i;
    EXPECT_LE(t[i].ready_s, backward_s + 1e-3) << i;
    EXPECT_EQ(t[i].start_s, -1) << "one rank: nothing to reduce";
    bytes += t[i].bytes;
  }
  EXPECT_EQ(bytes, model->num_parameters() * 4);
  // The first layout follows reverse registration order: the head's gradients are ready first
  // and the stem's last, but not strictly in between (residual shortcuts and SE branches
  // finish out of registration order).
  EXPECT_LT(t.front().ready_s, t.back().ready_s);
  bool out_of_order = false;
  for (size_t i = 1; i < t.size(); ++i) out_of_order |= t[i].ready_s < t[i - 1].ready_s;
  EXPECT_TRUE(out_of_order) << "this model's first layout was expected to be out of order";
  // The second backward lays the buckets out in the order observed (as DDP does): now each
  // bucket is complete no later than the next one.
  const int64_t version = sync.layout_version();
  train_step(*model, *opt, *comm, x, y, loss, s, so, nullptr);
  EXPECT_EQ(sync.layout_version(), version + 1);
  const auto& t2 = sync.timings();
  int64_t bytes2 = 0;
  for (size_t i = 0; i < t2.size(); ++i) {
    EXPECT_GE(t2[i].ready_s, 0) << i;
    if (i > 0) {
      EXPECT_GE(t2[i].ready_s, t2[i - 1].ready_s) << "bucket " << i;
    }
    bytes2 += t2[i].bytes;
  }
  EXPECT_EQ(bytes2, bytes);
  train_step(*model, *opt, *comm, x, y, loss, s, so, nullptr);
  EXPECT_EQ(sync.layout_version(), version + 1) << "laid out once only";
}

std::string read(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const char* kTiny =
    "--image-size 16 --set model.widths=[8,8,8,8] --set model.depths=[1,1,1,1] --set model.head_hidden=8 "
    "--set model.context_width=8";

TEST(Sweep, OneAndTwoRanksGiveTablesCsvPlotsAndPredictions) {
  if (std::string(LANCET_MPIEXEC).empty()) GTEST_SKIP() << "no MPI in this build: the sweep needs mpirun for 2 ranks";
  TempDir dir("sweep");
  const auto r = run_lancet("sweep --ranks 1,2 --threads 1 --batch-size 4 --steps 2 --warmup 1 --predict --project 8,16 " +
                            std::string(kTiny) + " --out " + dir / "s");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string md = read(dir / "s/sweep.md");
  EXPECT_NE(md.find("## Data-parallel scaling"), std::string::npos) << md;
  EXPECT_NE(md.find("## Serial vs parallel"), std::string::npos);
  EXPECT_NE(md.find("## Step phases"), std::string::npos);
  EXPECT_NE(md.find("Model error over the 1 multi-rank rows"), std::string::npos) << md;
  EXPECT_NE(md.find("## Projected"), std::string::npos);
  EXPECT_NE(md.find("| 2 | 2 | 8 |"), std::string::npos) << "2 ranks, 2 workers, global batch 8\n" << md;
  // CSV: header + 2 rows, both ok, speedup 1 for the 1-rank row.
  std::istringstream csv(read(dir / "s/sweep.csv"));
  std::vector<std::string> lines;
  for (std::string l; std::getline(csv, l);) lines.push_back(l);
  ASSERT_EQ(lines.size(), 3u) << read(dir / "s/sweep.csv");
  EXPECT_EQ(lines[1].rfind("cpu,fp32,1,1,1,4,4,\"ok\",", 0), 0u) << lines[1];
  EXPECT_EQ(lines[2].rfind("cpu,fp32,2,1,2,8,4,\"ok\",", 0), 0u) << lines[2];
  for (const char* f : {"scaling.svg", "scaling.png", "phases.svg", "phases.png", "sweep.json"})
    EXPECT_GT(std::filesystem::file_size(dir / (std::string("s/") + f)), 500u) << f;
  EXPECT_NE(read(dir / "s/scaling.svg").find("ideal"), std::string::npos);
  const Json rec = Json::parse(read(dir / "s/sweep.json"));
  ASSERT_EQ(rec.size(), 2u);
  EXPECT_EQ(rec[1]["bench"]["ranks"], 2);
  EXPECT_TRUE(rec[1].contains("predicted_images_per_s"));
  // The 2-rank run reduced every bucket: start and done times recorded.
  for (const auto& b : rec[1]["bench"]["buckets"]) EXPECT_GE(b["done_ms"].get<double>(), b["start_ms"].get<double>());

  // Prediction only, from the saved 1-rank result.
  const auto p = run_lancet("sweep --from " + dir / "s/runs/cpu_fp32_r1_t1_b4.json" +
                            " --project 8,64 --ranks-per-node 4 --net-inter 10:12.5 --out " + dir / "p");
  ASSERT_EQ(p.status, 0) << p.output;
  EXPECT_NE(p.output.find("| 64 | 16 |"), std::string::npos) << "64 ranks on 16 nodes of 4\n" << p.output;
  EXPECT_NE(p.output.find("12.5 GB/s"), std::string::npos) << p.output;
}

TEST(Sweep, AFailedConfigurationIsAReportedRowAndTheSweepGoesOn) {
  TempDir dir("sweep_fail");
  // Strong scaling of batch 3 over 2 ranks is impossible; the 1-rank row still runs.
  const auto r = run_lancet("sweep --ranks 1,2 --threads 1 --batch-size 3 --scaling strong --steps 1 --warmup 0 " +
                            std::string(kTiny) + " --out " + dir / "s");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("failed: batch 3 not divisible by 2 ranks"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1 of 2 configurations failed"), std::string::npos) << r.output;
  // Everything failing (a setting the runs reject) is an error naming the cause.
  const auto all = run_lancet("sweep --ranks 1 --steps 1 --warmup 0 --set model.depths=[0,1,1,1] --out " + dir / "t");
  EXPECT_NE(all.status, 0);
  EXPECT_NE(all.output.find("every configuration failed"), std::string::npos) << all.output;
  EXPECT_NE(all.output.find("depths must be positive"), std::string::npos) << all.output;
  const auto bad = run_lancet("sweep --ranks 0 --out " + dir / "u");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--ranks values must be >= 1"), std::string::npos) << bad.output;
}

// A multi-rank run that fails at runtime: its row's reason is lancet's error line from the log,
// not mpirun's help text printed after it, and the other rows run. With no 1-rank row there is
// no speedup baseline: the phase bars are still drawn and only they are listed as written.
TEST(Sweep, AMultiRankFailureShowsLancetsErrorAndTheOtherRowsRun) {
  if (std::string(LANCET_MPIEXEC).empty()) GTEST_SKIP() << "no MPI in this build: the sweep needs mpirun for 2 ranks";
  TempDir dir("sweep_rankfail");
  // bench refuses fp16/bf16 on the CPU at runtime, on every rank.
  const auto r = run_lancet("sweep --ranks 2 --precision fp32,bf16 --batch-size 4 --steps 1 --warmup 0 " +
                            std::string(kTiny) + " --out " + dir / "s");
  ASSERT_EQ(r.status, 0) << r.output;
  const Json rec = Json::parse(read(dir / "s/sweep.json"));
  ASSERT_EQ(rec.size(), 2u);
  EXPECT_EQ(rec[0]["precision"], "fp32");
  EXPECT_EQ(rec[0]["status"], "ok") << rec[0].dump();
  EXPECT_GT(rec[0]["images_per_s"].get<double>(), 0);
  const std::string why = rec[1]["status"].get<std::string>();
  EXPECT_EQ(why.rfind("failed (exit 1: lancet bench: error: rank ", 0), 0u) << why;
  EXPECT_NE(why.find("fp16/bf16 on the CPU are emulated"), std::string::npos) << why;
  for (const char* launcher : {"----", "MPI_ABORT", "ORTE", "MCA"}) EXPECT_EQ(why.find(launcher), std::string::npos) << why;
  EXPECT_NE(read(dir / "s/sweep.md").find("lancet bench: error: rank "), std::string::npos);
  EXPECT_NE(r.output.find("no scaling plot: no successful 1-rank run"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "s/scaling.svg"));
  EXPECT_GT(std::filesystem::file_size(dir / "s/phases.svg"), 500u);
  EXPECT_GT(std::filesystem::file_size(dir / "s/phases.png"), 500u);
  EXPECT_NE(r.output.find("/{sweep.md,sweep.csv,sweep.json,phases.svg,phases.png} and runs/"), std::string::npos)
      << r.output;
}

// Strong scaling: rows of one global batch form one group, so the 2-rank row has a speedup.
TEST(Sweep, StrongScalingRowsShareTheirGlobalBatchGroup) {
  if (std::string(LANCET_MPIEXEC).empty()) GTEST_SKIP() << "no MPI in this build: the sweep needs mpirun for 2 ranks";
  TempDir dir("sweep_strong");
  const auto r = run_lancet("sweep --ranks 1,2 --scaling strong --batch-size 4 --steps 1 --warmup 0 " +
                            std::string(kTiny) + " --out " + dir / "s");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string md = read(dir / "s/sweep.md");
  EXPECT_NE(md.find("**cpu fp32 1t 4** (device, precision, threads per rank, global batch)"), std::string::npos) << md;
  EXPECT_EQ(md.find("**cpu fp32 1t 2**"), std::string::npos) << md;
  std::istringstream csv(read(dir / "s/sweep.csv"));
  std::vector<std::string> lines;
  for (std::string l; std::getline(csv, l);) lines.push_back(l);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[2].rfind("cpu,fp32,2,1,2,4,2,\"ok\",", 0), 0u) << lines[2];
  auto cells = [](const std::string& line) {
    std::vector<std::string> v;
    std::istringstream ss(line);
    for (std::string c; std::getline(ss, c, ',');) v.push_back(c);
    return v;
  };
  const auto header = cells(lines[0]), row = cells(lines[2]);
  const size_t col = std::find(header.begin(), header.end(), "speedup") - header.begin();
  ASSERT_LT(col, row.size()) << lines[0];
  EXPECT_FALSE(row[col].empty()) << "the 2-rank row has a speedup: " << lines[2];
  EXPECT_GT(std::filesystem::file_size(dir / "s/scaling.svg"), 500u);
}

TEST(Sweep, TrainModeRunsRealTrainingWithLoaderWorkersAndTimeToAccuracy) {
  TempDir dir("sweep_train");
  const std::string tiny_train =
      "--image-size 16 --set model.widths=[8,8,8,8] --set model.depths=[1,1,1,1] --set model.head_hidden=8 "
      "--set model.context_width=8 --set train.epochs=2 --set data.synth.train=64 --set data.synth.val=32 "
      "--set data.synth.size=16";
  const auto r = run_lancet("sweep --mode train --ranks 1 --workers 0,1 --batch-size 16 --target-accuracy 0.01 " +
                            tiny_train + " --out " + dir / "s");
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string md = read(dir / "s/sweep.md");
  EXPECT_NE(md.find("real `lancet train` runs"), std::string::npos) << md;
  EXPECT_NE(md.find("time to 1.0% (s)"), std::string::npos) << md;
  const Json rec = Json::parse(read(dir / "s/sweep.json"));
  ASSERT_EQ(rec.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(rec[i]["status"], "ok") << rec[i].dump();
    EXPECT_EQ(rec[i]["data_workers"], static_cast<int>(i));
    EXPECT_GT(rec[i]["images_per_s"].get<double>(), 0);
    // Accuracy 1% is reached at the first epoch: the time to it is that epoch's time.
    EXPECT_GT(rec[i]["time_to_target_s"].get<double>(), 0);
    EXPECT_GE(rec[i]["val_accuracy"].get<double>(), 0.01);
    EXPECT_GT(rec[i]["peak_mib"].get<double>(), 0);  // from the run's metrics.jsonl
    EXPECT_TRUE(std::filesystem::exists(dir / ("s/runs/cpu_fp32_r1_t1_b16_w" + std::to_string(i) + ".run/final.h5")));
  }
  // Worker counts do not change what is trained: the same accuracy (bit-identical runs).
  EXPECT_EQ(rec[0]["val_accuracy"], rec[1]["val_accuracy"]);
  const auto bad = run_lancet("sweep --workers 1 --out " + dir / "t");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--workers (data.workers) needs --mode train"), std::string::npos) << bad.output;
}

TEST(BenchComm, FitsALinkBetweenTwoRanks) {
  if (std::string(LANCET_MPIEXEC).empty()) GTEST_SKIP() << "no MPI in this build";
  const std::string cmd = std::string(LANCET_MPIEXEC) + " --allow-run-as-root --oversubscribe -np 2 " +
                          testing::lancet_binary() + " bench comm --json --steps 2 --warmup 1";
  const auto r = testing::run_command(cmd);
  ASSERT_EQ(r.status, 0) << r.output;
  const Json j = Json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j["ranks"], 2);
  EXPECT_EQ(j["sizes"].size(), 8u);  // 4 KiB .. 64 MiB by 4x
  EXPECT_GT(j["fit"]["beta_GBps"].get<double>(), 0);
  // One rank: a clear refusal.
  const auto one = run_lancet("bench comm");
  EXPECT_NE(one.status, 0);
  EXPECT_NE(one.output.find("bench comm needs at least 2 ranks"), std::string::npos) << one.output;
}

// bench train under mpirun compares every setting across ranks, as training does: an MPMD job
// whose second rank normalises differently is refused naming the setting and both values.
TEST(BenchTrain, RanksWithDifferentSettingsAreRefused) {
  if (std::string(LANCET_MPIEXEC).empty()) GTEST_SKIP() << "no MPI in this build";
  const std::string bench = testing::lancet_binary() + " bench train --steps 1 --warmup 0 --batch-size 4 " + kTiny;
  const std::string cmd = std::string(LANCET_MPIEXEC) + " --allow-run-as-root --oversubscribe -np 1 " + bench +
                          " : --allow-run-as-root --oversubscribe -np 1 " + bench + " --set 'data.std=[0.3]'";
  const auto r = testing::run_command(cmd);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("the ranks disagree on data.std: rank 0 has [0.25], rank 1 has [0.3"), std::string::npos)
      << r.output;
}


// Pipeline rows: bench mode times the two-stage pipeline in one process beside the unpipelined
// rows (speedup against the serial run); a pipeline on several ranks is a reported failed row
// in bench mode.
TEST(Sweep, PipelineRowsBesideUnpipelinedOnes) {
  TempDir dir("sweep_pipe");
  const auto r = run_lancet("sweep --ranks 1,2 --threads 2 --pipeline 1,2 --batch-size 4 --steps 1 --warmup 0 " +
                            std::string(kTiny) + " --set pipeline.micro_batches=2 --out " + dir / "s");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("1x2 cpu fp32 b4 pipe2: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("bench mode times a pipeline in one process"), std::string::npos) << r.output;
  const Json rec = Json::parse(read(dir / "s/sweep.json"));
  int piped_ok = 0;
  for (const auto& row : rec)
    if (row.at("pipeline_stages") == 2 && row.at("status") == "ok") {
      ++piped_ok;
      EXPECT_GT(row.at("images_per_s").get<double>(), 0);
      EXPECT_EQ(row.at("bench").at("pipeline").at("stage").size(), 2u);
    }
  EXPECT_EQ(piped_ok, 1);
  const std::string csv = read(dir / "s/sweep.csv");
  EXPECT_NE(csv.find(",pipeline_stages\n"), std::string::npos) << csv;
  EXPECT_NE(csv.find("backward_ms,pipeline_ms,grad_sync_ms"), std::string::npos) << csv;
  EXPECT_NE(read(dir / "s/sweep.md").find("| forward | backward | pipeline |"), std::string::npos);
  // No 1 rank x 1 thread row: the scaling plot measures against each series' 1-rank run, and
  // pipelined rows are a series of their own, named as such.
  const std::string svg = read(dir / "s/scaling.svg");
  EXPECT_NE(svg.find(">Speedup against 1 rank (same threads per rank)<"), std::string::npos) << svg;
  EXPECT_NE(svg.find(">cpu fp32, 2 threads/rank, b4<"), std::string::npos) << svg;
  EXPECT_NE(svg.find(">cpu fp32, 2 threads/rank, b4, pipe2<"), std::string::npos) << svg;
  // Each bar is labelled with the row's whole identity, one word per line.
  const std::string bars = read(dir / "s/phases.svg");
  for (const char* word : {">1x2<", ">cpu<", ">pipe2<"}) EXPECT_NE(bars.find(word), std::string::npos) << word;
  EXPECT_GT(std::filesystem::file_size(dir / "s/phases.png"), 500u);
  EXPECT_NE(r.output.find("sweep.json,scaling.svg,scaling.png,phases.svg,phases.png}"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace lancet
