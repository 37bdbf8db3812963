// Run logs and where the time goes: progress display, JSONL/CSV files, TensorBoard event
// files (read back by TensorBoard itself when installed), Chrome traces, step phase timing.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/trace.h"
#include "layers/layers.h"
#include "tests/expect_error.h"
#include "trainer/profiler.h"
#include "trainer/run_log.h"
#include "trainer/tensorboard.h"

namespace fs = std::filesystem;
using namespace lancet;
using lancet::testing::expect_error;

namespace {

// A fresh folder per test, removed at the end.
struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("lancet_run_log_" + std::to_string(getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream is(text);
  for (std::string l; std::getline(is, l);) out.push_back(l);
  return out;
}

std::size_t count(const std::string& s, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + what.size())) ++n;
  return n;
}

ProgressInfo info(int64_t step, int64_t steps) {
  ProgressInfo p;
  p.epoch = 1;
  p.epochs = 10;
  p.step = step;
  p.steps = steps;
  p.loss = 0.71443;
  p.acc = 0.5124;
  p.lr = 1e-3;
  p.images_per_s = 1612.14;
  p.eta_s = 91;
  return p;
}

// Turns tracing off and drops its events whatever the test did.
struct TraceGuard {
  TraceGuard() { clear_trace(); }
  ~TraceGuard() {
    set_trace_enabled(false);
    clear_trace();
  }
};

}  // namespace

// ---- progress --------------------------------------------------------------------

TEST(Progress, FormatsOneLine) {
  EXPECT_EQ(ProgressDisplay::format(info(20, 125)),
            "epoch 1/10 step 20/125  loss 0.7144  acc 0.512  lr 1.00e-03  1612.1 img/s  ETA 1m31s");
  EXPECT_EQ(format_duration(42), "42s");
  EXPECT_EQ(format_duration(3600 + 5 * 60 + 7), "1h05m07s");
  EXPECT_EQ(format_duration(-1), "?");
}

TEST(Progress, PlainLinesEveryLogEveryAndAtEpochEnd) {
  std::ostringstream os;
  {
    ProgressDisplay p(os, 2, ProgressDisplay::Tty::no);
    EXPECT_FALSE(p.tty());
    for (int64_t s = 1; s <= 5; ++s) p.update(info(s, 5));
  }
  const auto lines = lines_of(os.str());
  ASSERT_EQ(lines.size(), 3u) << os.str();
  EXPECT_NE(lines[0].find("step 2/5"), std::string::npos);
  EXPECT_NE(lines[1].find("step 4/5"), std::string::npos);
  EXPECT_NE(lines[2].find("step 5/5"), std::string::npos);
  EXPECT_EQ(os.str().find('\r'), std::string::npos);
}

TEST(Progress, TerminalRewritesOneLineAndEndsItAtEpochEnd) {
  std::ostringstream os;
  ProgressDisplay p(os, 2, ProgressDisplay::Tty::yes, 0.0);
  EXPECT_TRUE(p.tty());
  for (int64_t s = 1; s <= 5; ++s) p.update(info(s, 5));
  EXPECT_EQ(count(os.str(), "\r"), 5u);
  EXPECT_EQ(count(os.str(), "\n"), 1u);
  EXPECT_EQ(os.str().back(), '\n');
  EXPECT_NE(os.str().rfind("\rstep", 0), 0u);
  EXPECT_NE(os.str().find("\repoch 1/10 step 5/5  loss"), std::string::npos);
}

TEST(Progress, TerminalRedrawsAreThrottled) {
  std::ostringstream os;
  {
    ProgressDisplay p(os, 1, ProgressDisplay::Tty::yes, 3600.0);
    for (int64_t s = 1; s <= 50; ++s) p.update(info(s, 50));  // first and last drawn only
    for (int64_t s = 1; s <= 10; ++s) p.update(info(s, 50));  // next epoch, stopped mid-way
  }
  EXPECT_EQ(count(os.str(), "\r"), 3u) << os.str();
  EXPECT_NE(os.str().find("step 50/50"), std::string::npos);
  EXPECT_EQ(count(os.str(), "\n"), 2u);  // the destructor ended the open line
  EXPECT_EQ(os.str().back(), '\n');
}

TEST(Progress, DetectsNoTerminalOnAStringStream) {
  std::ostringstream os;
  EXPECT_FALSE(ProgressDisplay(os).tty());
}

// ---- JSONL and CSV ----------------------------------------------------------------

TEST(RunFiles, JsonlTruncatesFreshAndAppendsOnResume) {
  TempDir d;
  const std::string path = d.file("steps.jsonl");
  {
    JsonlWriter w(path, false);
    w.write({{"step", 1}, {"loss", 0.5}});
    // flushed per line: visible before the writer closes
    EXPECT_EQ(lines_of(read_all(path)).size(), 1u);
    w.write({{"step", 2}, {"loss", 0.25}});
  }
  { JsonlWriter(path, true).write({{"step", 3}, {"loss", 0.125}}); }
  auto lines = lines_of(read_all(path));
  ASSERT_EQ(lines.size(), 3u);
  for (std::size_t i = 0; i < lines.size(); ++i) EXPECT_EQ(Json::parse(lines[i]).at("step").get<int>(), int(i + 1));
  EXPECT_DOUBLE_EQ(Json::parse(lines[2]).at("loss").get<double>(), 0.125);

  // A crash tore the last line: the resumed run's lines still start on their own lines.
  { std::ofstream(path, std::ios::app) << "{\"step\": 4, \"lo"; }
  { JsonlWriter(path, true).write({{"step", 5}}); }
  lines = lines_of(read_all(path));
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_EQ(Json::parse(lines[4]).at("step").get<int>(), 5);

  { JsonlWriter(path, false).write({{"step", 1}}); }
  EXPECT_EQ(lines_of(read_all(path)).size(), 1u);
}

TEST(RunFiles, CsvHeaderIsFixedAtTheFirstRow) {
  TempDir d;
  const std::string path = d.file("epochs.csv");
  {
    CsvWriter w(path, false);
    w.write_row({{"epoch", 1}, {"train_loss", 0.5}, {"val_acc", 0.75}});
    w.write_row({{"val_acc", 0.875}, {"epoch", 2}});  // reordered, one missing
    expect_error([&] { w.write_row({{"epoch", 3}, {"lr", 1e-3}}); }, {"lr", "not in the header", "epochs.csv"});
  }
  EXPECT_EQ(read_all(path), "epoch,train_loss,val_acc\n1,0.5,0.75\n2,,0.875\n");

  {
    CsvWriter w(path, true);  // resumed: the header comes from the file
    EXPECT_EQ(w.columns(), (std::vector<std::string>{"epoch", "train_loss", "val_acc"}));
    w.write_row({{"train_loss", 0.125}, {"epoch", 3}, {"val_acc", 0.9}});
  }
  EXPECT_EQ(read_all(path), "epoch,train_loss,val_acc\n1,0.5,0.75\n2,,0.875\n3,0.125,0.9\n");

  { CsvWriter(path, false).write_row({{"a,b", 1}}); }
  EXPECT_EQ(read_all(path), "\"a,b\"\n1\n");
  EXPECT_EQ(CsvWriter(path, true).columns(), std::vector<std::string>{"a,b"});
}

TEST(RunFiles, RunLogCreatesTheFolderAndItsFiles) {
  TempDir d;
  const std::string dir = d.file("run/sub");
  {
    RunLog log(dir, false);
    log.steps.write({{"step", 1}});
    log.metrics.write({{"epoch", 1}});
    log.epochs.write_row({{"epoch", 1}});
  }
  EXPECT_EQ(read_all(dir + "/steps.jsonl"), "{\"step\":1}\n");
  EXPECT_EQ(read_all(dir + "/metrics.jsonl"), "{\"epoch\":1}\n");
  EXPECT_EQ(read_all(dir + "/epochs.csv"), "epoch\n1\n");
  expect_error([&] { JsonlWriter(d.file("no/such/dir/x.jsonl"), false); }, {"cannot open", "x.jsonl"});
}

// ---- TensorBoard ----------------------------------------------------------------------

TEST(TensorBoard, Crc32cKnownVector) {
  const char* s = "123456789";
  EXPECT_EQ(crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(crc32c(s + 4, 5, crc32c(s, 4)), 0xE3069283u);  // continued
  EXPECT_EQ(crc32c(s, 0), 0u);
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(masked_crc32c(s, 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

namespace {

uint64_t le(const std::string& b, std::size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(static_cast<unsigned char>(b[at + i])) << (8 * i);
  return v;
}

// Splits a TFRecord file into its records, checking both CRCs of each.
std::vector<std::string> read_tfrecords(const std::string& path) {
  const std::string b = read_all(path);
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at < b.size()) {
    EXPECT_LE(at + 12, b.size());
    if (at + 12 > b.size()) break;
    const uint64_t n = le(b, at, 8);
    EXPECT_EQ(le(b, at + 8, 4), masked_crc32c(b.data() + at, 8));
    EXPECT_LE(at + 12 + n + 4, b.size());
    if (at + 12 + n + 4 > b.size()) break;
    out.push_back(b.substr(at + 12, n));
    EXPECT_EQ(le(b, at + 12 + n, 4), masked_crc32c(b.data() + at + 12, n));
    at += 12 + n + 4;
  }
  return out;
}

std::vector<std::string> event_files(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0) out.push_back(e.path().string());
  return out;
}

}  // namespace

TEST(TensorBoard, WritesFramedEventRecords) {
  TempDir d;
  std::string path;
  {
    TensorBoardWriter w(d.path.string(), 2);
    path = w.path();
    w.add_scalar("train/loss", 0.5, 7, 1000.0);
    w.add_scalar("train/loss", 0.25, 300, 1001.0);  // a two-byte varint step
  }
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  EXPECT_EQ(event_files(d.path), std::vector<std::string>{path});
  EXPECT_NE(path.find(std::string(".") + host), std::string::npos);

  const auto recs = read_tfrecords(path);
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_NE(recs[0].find("brain.Event:2"), std::string::npos);
  // Event{wall_time=1000.0, step=300, summary{value{tag="train/loss", simple_value=0.25f}}}
  std::string want = "\x09";
  const double wt = 1001.0;
  uint64_t bits;
  std::memcpy(&bits, &wt, 8);
  for (int i = 0; i < 8; ++i) want += char((bits >> (8 * i)) & 0xFF);
  want += std::string("\x10\xAC\x02", 3);                   // step 300
  want += std::string("\x2A\x13\x0A\x11\x0A\x0Atrain/loss", 16);  // summary{value{tag
  want += std::string("\x15\x00\x00\x80\x3E", 5);           // simple_value 0.25f
  EXPECT_EQ(recs[2], want);

  // Two writers in the same second get two files.
  TensorBoardWriter a(d.path.string()), b(d.path.string());
  EXPECT_NE(a.path(), b.path());
}

TEST(TensorBoard, TensorBoardReadsItBack) {
  TempDir d;
  std::string args;
  {
    TensorBoardWriter w(d.path.string(), 3);
    for (int step = 0; step < 5; ++step) {
      const double loss = 1.0 / (step + 1), acc = 0.5 + 0.1 * step;
      w.add_scalar("train/loss", loss, step * 10);
      w.add_scalar("val/acc", acc, step * 10);
      char buf[96];
      std::snprintf(buf, sizeof buf, " train/loss:%d:%.9g val/acc:%d:%.9g", step * 10, loss, step * 10, acc);
      args += buf;
    }
  }
  const std::string cmd = "python3 " LANCET_SOURCE_DIR "/tests/tensorboard_readback.py " + d.path.string() + args;
  const int status = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(status)) << cmd;
  const int rc = WEXITSTATUS(status);
  if (rc == 77 || rc == 127) GTEST_SKIP() << "python3 with the tensorboard package is not available (pip install tensorboard)";
  EXPECT_EQ(rc, 0) << cmd;
}

TEST(TensorBoard, AResumedRunReplacesTheStepsAfterItsCheckpoint) {
  TempDir d;
  {  // the first run logged steps 1..10, then died; its last checkpoint was at step 6
    TensorBoardWriter w(d.path.string());
    for (int step = 1; step <= 10; ++step) w.add_scalar("train/loss", 100 + step, step, 1000.0 + step);
  }
  std::string args;
  for (int step = 1; step <= 6; ++step) args += " train/loss:" + std::to_string(step) + ":" + std::to_string(100 + step);
  {  // the resumed run (a new file: another name, one second later at least)
    TensorBoardWriter w(d.path.string());
    w.add_session_start(7);
    for (int step = 7; step <= 12; ++step) {
      w.add_scalar("train/loss", 200 + step, step, 2000.0 + step);
      args += " train/loss:" + std::to_string(step) + ":" + std::to_string(200 + step);
    }
  }
  ASSERT_EQ(event_files(d.path).size(), 2u);
  const std::string cmd = "python3 " LANCET_SOURCE_DIR "/tests/tensorboard_readback.py " + d.path.string() + args;
  const int status = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(status)) << cmd;
  const int rc = WEXITSTATUS(status);
  if (rc == 77 || rc == 127) GTEST_SKIP() << "python3 with the tensorboard package is not available (pip install tensorboard)";
  EXPECT_EQ(rc, 0) << "each step once, the resumed run's values from step 7 on: " << cmd;
}

// ---- traces -------------------------------------------------------------------------

TEST(Trace, OffByDefaultRecordsNothing) {
  TraceGuard guard;
  EXPECT_FALSE(trace_enabled());
  { TraceScope t("x", "y"); }
  EXPECT_TRUE(trace_events().empty());
}

TEST(Trace, NestedScopesOnTwoThreadsMakeAChromeTrace) {
  TraceGuard guard;
  TempDir d;
  set_trace_enabled(true);
  auto work = [](const char* outer) {
    TraceScope a(outer, "step");
    {
      TraceScope b("inner \"quoted\"", "forward");
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  };
  std::thread t1(work, "outer1"), t2(work, "outer2");
  t1.join();
  t2.join();
  set_trace_enabled(false);
  { TraceScope ignored("after", "off"); }

  const std::string path = d.file("trace.json");
  write_chrome_trace(path);
  EXPECT_FALSE(fs::exists(path + ".tmp." + std::to_string(getpid())));
  const Json j = Json::parse(read_all(path));
  const Json& ev = j.at("traceEvents");
  ASSERT_EQ(ev.size(), 4u) << j.dump();
  std::set<int> tids;
  for (const Json& e : ev) {
    for (const char* key : {"name", "cat", "ph", "ts", "dur", "pid", "tid"}) EXPECT_TRUE(e.contains(key)) << key;
    EXPECT_EQ(e.at("ph"), "X");
    EXPECT_EQ(e.at("pid").get<long>(), static_cast<long>(getpid()));
    EXPECT_GE(e.at("dur").get<double>(), 0.0);
    tids.insert(e.at("tid").get<int>());
  }
  EXPECT_EQ(tids.size(), 2u);
  // On each thread the inner event lies within the outer one.
  for (const int tid : tids) {
    const Json* outer = nullptr;
    const Json* inner = nullptr;
    for (const Json& e : ev)
      if (e.at("tid").get<int>() == tid) (e.at("cat") == "step" ? outer : inner) = &e;
    ASSERT_TRUE(outer && inner);
    EXPECT_EQ(inner->at("name"), "inner \"quoted\"");
    EXPECT_GE(inner->at("dur").get<double>(), 1500.0);
    EXPECT_GE(inner->at("ts").get<double>(), outer->at("ts").get<double>());
    EXPECT_LE(inner->at("ts").get<double>() + inner->at("dur").get<double>(),
              outer->at("ts").get<double>() + outer->at("dur").get<double>() + 1e-3);
  }
  expect_error([&] { write_chrome_trace(d.file("no/such/dir/trace.json")); }, {"write_chrome_trace", "trace.json"});
}

TEST(Trace, ModuleForwardAndBackwardAreTraced) {
  TraceGuard guard;
  Sequential seq;
  seq.emplace<ReLU>();
  const Tensor x = Tensor::from_vector({-1.f, 2.f, -3.f, 4.f}, {1, 1, 2, 2});
  set_trace_enabled(true);
  SavedPtr saved;
  const Tensor y = seq.forward(x, &saved, Stream::cpu());
  seq.backward(Tensor::full(y.shape(), 1.f), *saved, true, Stream::cpu());
  set_trace_enabled(false);
  std::vector<std::string> names;
  for (const auto& e : trace_events()) names.push_back(e.category + "/" + e.name);
  // Events are recorded as scopes close: the inner module first.
  EXPECT_EQ(names, (std::vector<std::string>{"forward/ReLU", "forward/Sequential", "backward/ReLU",
                                             "backward/Sequential"}));
}

TEST(Trace, DropsEventsPastTheCap) {
  TraceGuard guard;
  set_trace_enabled(true, 3);
  for (int i = 0; i < 5; ++i) TraceScope t("e", "c");
  set_trace_enabled(false);
  EXPECT_EQ(trace_events().size(), 3u);
  EXPECT_EQ(trace_dropped_events(), 2u);
}

// ---- phase timing ------------------------------------------------------------------

TEST(Profiler, StatisticsOfKnownDurations) {
  StepProfiler prof;
  // 100 steps: forward k ms, backward 2k ms, step 4k ms (k = 1..100).
  for (int k = 1; k <= 100; ++k) {
    prof.begin_step();
    prof.add(Phase::forward, k * 1e-3);
    prof.add(Phase::backward, k * 1e-3);
    prof.add(Phase::backward, k * 1e-3);  // entered twice in one step: summed
    prof.end_step(4 * k * 1e-3);
  }
  EXPECT_EQ(prof.steps(), 100);
  const PhaseStats f = prof.stats(Phase::forward);
  EXPECT_NEAR(f.mean_s, 50.5e-3, 1e-12);
  EXPECT_NEAR(f.p50_s, 50.5e-3, 1e-12);
  EXPECT_NEAR(f.p95_s, 95.05e-3, 1e-12);
  EXPECT_NEAR(f.total_s, 5.05, 1e-9);
  EXPECT_NEAR(prof.stats(Phase::backward).p95_s, 2 * 95.05e-3, 1e-12);
  EXPECT_EQ(prof.stats(Phase::optimizer).mean_s, 0.0);
  EXPECT_NEAR(prof.step_stats().mean_s, 4 * 50.5e-3, 1e-12);
  EXPECT_NEAR(prof.other_stats().mean_s, 50.5e-3, 1e-12);

  const Json j = prof.to_json();
  EXPECT_EQ(j.at("steps").get<int>(), 100);
  EXPECT_NEAR(j.at("phases").at("forward").at("p95_ms").get<double>(), 95.05, 1e-9);
  EXPECT_NEAR(j.at("phases").at("backward").at("share").get<double>(), 0.5, 1e-12);
  EXPECT_NEAR(j.at("step").at("mean_ms").get<double>(), 202.0, 1e-9);
  for (int i = 0; i < kNumPhases; ++i) EXPECT_TRUE(j.at("phases").contains(phase_name(static_cast<Phase>(i))));

  const std::string table = prof.table();
  EXPECT_NE(table.find("p95 ms"), std::string::npos) << table;
  EXPECT_NE(table.find("forward        50.500     50.500     95.050    25.0%"), std::string::npos) << table;
  EXPECT_NE(table.find("step          202.000    202.000    380.200"), std::string::npos) << table;

  prof.reset();
  EXPECT_EQ(prof.steps(), 0);
  EXPECT_EQ(prof.step_stats().mean_s, 0.0);
}

TEST(Profiler, ScopesTimeTheirPhaseAndEmitTraceEvents) {
  TraceGuard guard;
  set_trace_enabled(true);
  StepProfiler prof;
  prof.begin_step();
  {
    auto p = prof.phase(Phase::data_wait);
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
  }
  { auto p = prof.phase(Phase::optimizer); }
  prof.end_step();
  set_trace_enabled(false);

  EXPECT_GE(prof.stats(Phase::data_wait).mean_s, 2.5e-3);
  EXPECT_GE(prof.step_stats().mean_s, prof.stats(Phase::data_wait).mean_s);
  std::vector<std::string> names;
  for (const auto& e : trace_events()) names.push_back(e.category + "/" + e.name);
  EXPECT_EQ(names, (std::vector<std::string>{"phase/data_wait", "phase/optimizer", "step/step"}));
  expect_error([&] { prof.end_step(); }, {"end_step", "begin_step"});
  // A second device's stream joins a CUDA timed stream only (a pipeline's second GPU).
  expect_error([&] { prof.set_stream(Stream::cpu(), {Stream{Device::cuda(1), nullptr}}); },
               {"StepProfiler", "joined stream on cuda:1"});
}
