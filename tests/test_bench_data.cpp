// `lancet bench data` end to end, untimed: on a tiny synthetic image folder and its pack, one
// run compares the two (--data-list) over two worker counts; the JSON and the table hold one row
// per (source, batch memory, workers), each with images/s > 0. Pinned batches are refused up
// front without a GPU, naming the reason; with one, every row also carries its host->device copy.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "cli_util.h"
#include "gpu_util.h"
#include "trainer/config.h"

using namespace lancet;
using namespace lancet::testing;

namespace {

class BenchDataCli : public ::testing::Test {
 protected:
  // The tiny folder (16 train, 4 val images of 32x32) and its pack.
  void make_data() const {
    RunResult r = run_lancet("synth --out " + folder + " --train 16 --val 4 --size 32 --threads 1");
    ASSERT_EQ(r.status, 0) << r.output;
    r = run_lancet("prep --data " + folder + " --out " + pack + " --image-size 32 --threads 1");
    ASSERT_EQ(r.status, 0) << r.output;
  }
  // A bench data run over both sources with `extra` options.
  RunResult bench(const std::string& extra) const {
    return run_lancet("bench data --data-list " + folder + "," + pack +
                      " --image-size 32 --channels 1 --batch-size 4 --batches 3 --threads 1 " + extra);
  }
  static Json parse_json(const RunResult& r) {  // the JSON line; the load log goes to stderr
    const size_t at = r.output.find("{\"benchmark\"");
    EXPECT_NE(at, std::string::npos) << r.output;
    return Json::parse(r.output.substr(at, r.output.find('\n', at) - at));
  }

  TempDir dir{"bench_data"};
  const std::string folder = dir / "synth", pack = dir / "pack.h5";
};

}  // namespace

TEST_F(BenchDataCli, ComparesFolderAndPackInOneRun) {
  ASSERT_NO_FATAL_FAILURE(make_data());
  RunResult r = bench("--workers-list 0,1 --json");
  ASSERT_EQ(r.status, 0) << r.output;
  const Json j = parse_json(r);
  EXPECT_EQ(j.at("benchmark"), "data");
  EXPECT_EQ(j.at("device"), "cpu");
  ASSERT_EQ(j.at("sources").size(), 2u);
  for (const Json& s : j.at("sources")) {
    EXPECT_EQ(s.at("train_images"), 16);
    EXPECT_GT(s.at("load_images_per_s").get<double>(), 0);
  }
  EXPECT_EQ(j.at("sources")[0].at("source"), folder);
  EXPECT_EQ(j.at("sources")[1].at("source"), pack);
  EXPECT_EQ(j.at("config").at("batch_memory"), Json({"pageable"}));
  const Json& rows = j.at("results");
  ASSERT_EQ(rows.size(), 4u);  // (folder, pack) x (0, 1 workers), in that order
  for (size_t i = 0; i < rows.size(); ++i) {
    SCOPED_TRACE(rows[i].dump());
    EXPECT_EQ(rows[i].at("source"), i < 2 ? folder : pack);
    EXPECT_EQ(rows[i].at("batch_memory"), "pageable");
    EXPECT_EQ(rows[i].at("workers"), static_cast<int>(i % 2));
    EXPECT_EQ(rows[i].at("images"), 12);  // 3 batches of 4
    EXPECT_GT(rows[i].at("images_per_s").get<double>(), 0);
    EXPECT_GT(rows[i].at("batch_ms_mean").get<double>(), 0);
    EXPECT_FALSE(rows[i].contains("h2d_ms_per_batch"));  // no copy on the CPU
  }

  // The table: a header, then one row per source and worker count, in the same order.
  r = bench("--workers-list 0,2");
  ASSERT_EQ(r.status, 0) << r.output;
  std::istringstream lines(r.output);
  std::string line;
  while (std::getline(lines, line) && line.rfind("source", 0) != 0) {
  }
  std::istringstream header(line);
  std::vector<std::string> cols;
  for (std::string c; header >> c;) cols.push_back(c);
  EXPECT_EQ(cols, (std::vector<std::string>{"source", "memory", "workers", "img/s", "ms/batch"})) << r.output;
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(std::getline(lines, line)) << r.output;
    std::istringstream row(line);
    std::string s, memory;
    int workers = -1;
    double img_s = 0, ms = 0;
    row >> s >> memory >> workers >> img_s >> ms;
    EXPECT_EQ(s, i < 2 ? folder : pack) << line;
    EXPECT_EQ(memory, "pageable") << line;
    EXPECT_EQ(workers, i % 2 ? 2 : 0) << line;
    EXPECT_GT(img_s, 0) << line;
    EXPECT_GE(ms, 0) << line;  // 0.00 ms when a batch of 4 at 32x32 takes microseconds
  }
}

TEST_F(BenchDataCli, PinnedBatchesTimeTheCopyOrAreRefused) {
  // The option checks come before any source is read: no data needed for them.
  if (gpu_available()) {
    ASSERT_NO_FATAL_FAILURE(make_data());
    const RunResult r = bench("--workers-list 0 --batch-memory pageable,pinned --device cuda --json");
    ASSERT_EQ(r.status, 0) << r.output;
    const Json j = parse_json(r);
    const Json& rows = j.at("results");
    ASSERT_EQ(rows.size(), 4u);  // (folder, pack) x (pageable, pinned)
    for (size_t i = 0; i < rows.size(); ++i) {
      SCOPED_TRACE(rows[i].dump());
      EXPECT_EQ(rows[i].at("batch_memory"), i % 2 ? "pinned" : "pageable");
      EXPECT_GT(rows[i].at("images_per_s").get<double>(), 0);
      EXPECT_GT(rows[i].at("h2d_ms_per_batch").get<double>(), 0);
      EXPECT_GT(rows[i].at("h2d_gb_per_s").get<double>(), 0);
    }
  } else {
    const RunResult r = bench("--device cuda");
    EXPECT_EQ(r.status, 1) << r.output;
    EXPECT_NE(r.output.find("train.device cuda:0: "), std::string::npos) << r.output;
  }
  // Without a GPU to copy to, pinned memory has nothing to speed up.
  RunResult r = bench("--batch-memory pinned");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("bench data: --batch-memory pinned needs --device cuda"), std::string::npos) << r.output;
  r = bench("--batch-memory paged");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("paged not in {pageable,pinned}"), std::string::npos) << r.output;
  // --data-list replaces --data; a missing source is named before any row runs.
  r = bench("--data " + folder);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("give --data or --data-list, not both"), std::string::npos) << r.output;
  r = run_lancet("bench data --data-list " + dir.path.string() + "," + dir / "nothing" + " --batches 1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--data-list " + dir / "nothing" + ": no such file or folder"), std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("loading"), std::string::npos) << r.output;
}
