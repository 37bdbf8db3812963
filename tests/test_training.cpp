// The training loop end to end on a small job: the run folder holds metrics.jsonl and
// final.h5, the saved weights reproduce the reported validation figures when loaded again,
// the same seed gives the same weights, and CLI errors are one clear line. evaluate() fed by
// the loader gives the per-batch results bit for bit with any worker count, and a bad image
// file is one clear line naming it. (Learning to a stated accuracy is test_slow_default_job.cpp.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <opencv2/imgcodecs.hpp>
#include <random>
#include <sstream>

#include "cli_util.h"
#include "comm/communicator.h"
#include "data/dataset.h"
#include "data/image_dataset.h"
#include "data/image_folder.h"
#include "data/h5file.h"
#include "kernels/loss.h"
#include "tests/expect_error.h"
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
  std::string header, first;
  for (std::string line; std::getline(csv, line); ++rows) {
    if (rows == 0) header = line;
    if (rows == 1) first = line;
  }
  EXPECT_EQ(rows, 1 + 64);
  // Each row says which image it is: its file in the synthetic set's folder.
  EXPECT_EQ(header.rfind("index,source,label,predicted,prob_", 0), 0u) << header;
  EXPECT_EQ(first.rfind("0," + (tmp / "cache"), 0), 0u) << first;
  EXPECT_NE(first.find(".png,"), std::string::npos) << first;
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
  // --nsys-steps on a CPU training device: refused at startup (not "cudaProfilerStart() failed" mid-run).
  r = run_lancet("train --device cpu --nsys-steps 2:3 --max-steps 4");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("train.nsys_steps (--nsys-steps) 2:3 needs a CUDA training device"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("train.device is 'cpu'"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("generating"), std::string::npos) << "work started before the refusal: " << r.output;
  // A model whose output count is not the data's class count: the data and its classes named.
  r = run_lancet("train --set model.num_classes=3 --set data.synth.train=8 --set data.synth.val=4 "
                 "--set data.synth.size=32 --image-size 32 --max-steps 1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("model.num_classes 3 but synthetic chest X-rays in "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("has 2 classes [normal, opacity] (leave model.num_classes out"), std::string::npos)
      << r.output;
  // --help names every config section.
  r = run_lancet("train --help");
  EXPECT_EQ(r.status, 0);
  const Json defaults = default_config();
  std::string sections;
  for (auto it = defaults.begin(); it != defaults.end(); ++it) sections += (sections.empty() ? "" : ", ") + it.key();
  EXPECT_NE(r.output.find("(sections: " + sections + ")"), std::string::npos) << r.output;
  for (const char* s : {"schedule", "early_stopping", "amp", "dist", "pipeline"})
    EXPECT_NE(sections.find(s), std::string::npos) << s;
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

namespace {

// A small MedicalCNN (dropout and BatchNorm active in training mode, so eval mode matters).
std::unique_ptr<MedicalCNN> eval_model(int in_channels, int num_classes) {
  return make_model(Json{{"widths", {8, 8, 16, 16}}, {"depths", {1, 1, 1, 1}}, {"head_hidden", 16},
                         {"in_channels", in_channels}, {"num_classes", num_classes}},
                    5);
}

// n random 1x24x24 images, labels i * 7 % 3.
InMemoryDataset random_dataset(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Tensor images = Tensor::empty({n, 1, 24, 24});
  for (int64_t i = 0; i < images.numel(); ++i) images.data<float>()[i] = normal(rng);
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < n; ++i) labels.push_back(i * 7 % 3);
  return InMemoryDataset(images, labels, {"normal", "effusion", "nodule"});
}

// evaluate() as it was before the loader fed it: make_batch for each batch of batch_size (the
// last one partial) in this thread, one forward per batch, the per-batch mean loss re-weighted by
// the batch size, softmax in double from the row maximum, argmax into the confusion matrix.
EvalResult per_batch_reference(Module& model, const Dataset& ds, int batch_size, const Loss& loss) {
  const bool was_training = model.training();
  model.eval();
  EvalResult r;
  r.cm = ConfusionMatrix(ds.num_classes());
  const Shape ss = ds.sample_shape();
  double loss_sum = 0;
  for (int64_t start = 0; start < ds.size(); start += batch_size) {
    const int64_t b = std::min<int64_t>(batch_size, ds.size() - start);
    std::vector<int64_t> idx(static_cast<size_t>(b));
    std::iota(idx.begin(), idx.end(), start);
    Tensor x = Tensor::empty({b, ss[0], ss[1], ss[2]});
    Tensor y = Tensor::empty({b}, DType::i64);
    make_batch(ds, idx, x, y);
    const Tensor logits = model.forward(x, nullptr, Stream::cpu());
    Tensor none1, none2;
    loss_sum += static_cast<double>(softmax_cross_entropy(logits, y, Tensor(), loss.label_smoothing, none1, none2,
                                                          Stream::cpu())) *
                b;
    const std::vector<float> l = logits.to_vector();
    const int64_t k = logits.dim(1);
    const auto pred = argmax_rows(l.data(), b, k);
    for (int64_t i = 0; i < b; ++i) {
      r.cm.add(y.data<int64_t>()[i], pred[static_cast<size_t>(i)]);
      r.labels.push_back(y.data<int64_t>()[i]);
      const float* row = l.data() + i * k;
      const double mx = row[pred[static_cast<size_t>(i)]];
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
      for (int64_t j = 0; j < k; ++j) r.probs.push_back(static_cast<float>(std::exp(row[j] - mx) / sum));
    }
  }
  r.loss = ds.size() ? loss_sum / ds.size() : 0;
  model.train(was_training);
  return r;
}

// Bit for bit: loss, probabilities, labels and every confusion-matrix cell.
void expect_same_result(const EvalResult& got, const EvalResult& want, const std::string& what) {
  EXPECT_EQ(got.loss, want.loss) << what;
  EXPECT_TRUE(got.probs == want.probs) << what << ": probabilities differ";
  EXPECT_EQ(got.labels, want.labels) << what;
  ASSERT_EQ(got.cm.num_classes(), want.cm.num_classes()) << what;
  EXPECT_EQ(got.cm.total(), want.cm.total()) << what;
  for (int a = 0; a < want.cm.num_classes(); ++a)
    for (int p = 0; p < want.cm.num_classes(); ++p) EXPECT_EQ(got.cm.at(a, p), want.cm.at(a, p)) << what;
}

}  // namespace

// The loader (0, 1 or 3 workers, prefetch 1 or 2) feeds evaluate() the make_batch batches: the
// per-batch reference's result bit for bit, a partial last batch (or one batch larger than the
// set) included, with the samples in dataset order; the model's mode comes back; a profiler
// sees one step per batch.
TEST(Evaluate, LoaderFedResultIsThePerBatchOneForAnyWorkerCount) {
  const InMemoryDataset ds = random_dataset(23, 17);
  auto model = eval_model(1, 3);
  model->train();
  Loss loss;
  loss.label_smoothing = 0.1f;
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < ds.size(); ++i) labels.push_back(ds.label(i));
  for (int bs : {5, 8, 23, 64}) {  // 4 x 5 + 3, 2 x 8 + 7, one batch, one batch of fewer rows
    const EvalResult want = per_batch_reference(*model, ds, bs, loss);
    ASSERT_EQ(want.labels, labels);
    ASSERT_EQ(want.probs.size(), static_cast<size_t>(23 * 3));
    for (int workers : {0, 1, 3}) {
      for (int prefetch : {1, 2}) {
        const std::string what = "batch " + std::to_string(bs) + ", " + std::to_string(workers) + " workers, prefetch " +
                                 std::to_string(prefetch);
        EvalLoading loading;
        loading.workers = workers;
        loading.prefetch = prefetch;
        StepProfiler prof;
        expect_same_result(evaluate(*model, ds, bs, loss, Stream::cpu(), &prof, loading), want, what);
        EXPECT_EQ(prof.steps(), (23 + bs - 1) / bs) << what;
        EXPECT_TRUE(model->training()) << what;
      }
    }
    EvalLoading three;
    three.workers = 3;
    auto comm = make_single_process_communicator();
    expect_same_result(evaluate_sharded(*model, ds, bs, loss, Stream::cpu(), *comm, three), want,
                       "evaluate_sharded, batch " + std::to_string(bs));
  }
  // An empty set (a rank's empty shard): nothing to evaluate, whatever the loading.
  EvalLoading three;
  three.workers = 3;
  const EvalResult none = evaluate(*model, random_dataset(0, 1), 4, loss, Stream::cpu(), nullptr, three);
  EXPECT_EQ(none.loss, 0.0);
  EXPECT_EQ(none.cm.total(), 0);
  EXPECT_TRUE(none.probs.empty() && none.labels.empty());
  // The config's loading: data.workers and data.prefetch, no pinned memory on the CPU.
  Json c = default_config();
  apply_override(c, "data.workers=3");
  apply_override(c, "data.prefetch=4");
  const EvalLoading from_config = eval_loading(data_config(c), Device::cpu());
  EXPECT_EQ(from_config.workers, 3);
  EXPECT_EQ(from_config.prefetch, 4);
  EXPECT_EQ(from_config.allocator, nullptr);
  expect_error([&] { evaluate(*model, ds, 0, loss, Stream::cpu()); }, {"evaluate", "batch size 0"});
  EvalLoading bad;
  bad.workers = -1;
  expect_error([&] { evaluate(*model, ds, 4, loss, Stream::cpu(), nullptr, bad); }, {"data.workers", "-1"});
  EXPECT_TRUE(model->training());
}

// An image folder read as it goes (data.cache false): evaluate() gives the cached dataset's
// result with any worker count; a file that no longer decodes stops it with one line naming
// the file, from a worker or from a batch built in parallel in the evaluating thread, and the
// model's mode comes back.
TEST(Evaluate, BadImageFileIsOneLineNamingIt) {
  TempDir tmp("eval_bad");
  std::mt19937 rng(8);
  for (int k = 0; k < 2; ++k) {
    const std::filesystem::path dir = tmp.path / "src" / "val" / ("c" + std::to_string(k));
    std::filesystem::create_directories(dir);
    for (int i = 0; i < 5; ++i) {
      cv::Mat img(20, 24, CV_8UC1);
      for (size_t b = 0; b < img.total(); ++b) img.data[b] = static_cast<uint8_t>(rng() % 256);
      ASSERT_TRUE(cv::imwrite((dir / ("i0" + std::to_string(i) + ".png")).string(), img));
    }
  }
  ImageLoadOptions lo;
  lo.channels = 1;
  lo.image_size = 24;
  const auto cached = load_cached_dataset(tmp / "src", "val", lo);
  const auto streamed = load_cached_dataset(tmp / "src", "val", lo, BadSample::error, nullptr, /*stream=*/true);
  ASSERT_EQ(streamed->size(), 10);
  auto model = eval_model(1, 2);
  model->train();
  const EvalResult want = per_batch_reference(*model, *cached, 6, Loss{});
  for (int workers : {0, 2}) {
    EvalLoading loading;
    loading.workers = workers;
    expect_same_result(evaluate(*model, *streamed, 6, Loss{}, Stream::cpu(), nullptr, loading), want,
                       "streamed, " + std::to_string(workers) + " workers");
  }
  // c0/i03.png is sample 3: in the first batch of 6 rows, which workers 0 builds over threads.
  const std::string bad = tmp / "src/val/c0/i03.png";
  std::ofstream(bad, std::ios::trunc) << "not a png at all";
  for (int workers : {0, 2}) {
    EvalLoading loading;
    loading.workers = workers;
    expect_error([&] { evaluate(*model, *streamed, 6, Loss{}, Stream::cpu(), nullptr, loading); }, {bad, "cannot decode"});
    EXPECT_TRUE(model->training()) << workers << " workers";
  }
}
