// `lancet train` with no arguments, the embedded default job, run exactly as a user runs it:
// it must generate its dataset, show progress and reach 90% validation accuracy (about 1.5
// minutes on 2 cores; labelled `slow`).
#include <gtest/gtest.h>

#include <string>

#include "cli_util.h"

using namespace lancet::testing;

namespace {
// The value after "  <name> " in the final validation report.
double report_value(const std::string& log, const std::string& name) {
  const std::string key = "\n  " + name + " ";
  const auto at = log.rfind(key);
  if (at == std::string::npos) return -1;
  return std::stod(log.substr(at + key.size()));
}
}  // namespace

// `lancet train` with no arguments: the embedded default job must reach 90% validation
// accuracy (the promise; it takes about 1.5 minutes on 2 cores).
TEST(DefaultJob, ReachesNinetyPercent) {
  TempDir tmp("default_job");
  const RunResult r = run_lancet_env("LANCET_CACHE=" + tmp / "cache", "train");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("generating the synthetic chest X-ray dataset (4000 train, 1000 val"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("ETA"), std::string::npos) << "no progress display in: " << r.output;
  const double acc = report_value(r.output, "accuracy");
  EXPECT_GE(acc, 0.90) << r.output;
}

