// `lancet forward` against the PyTorch reference fixtures (tests/fixtures, produced by
// tests/reference/make_fixtures.py from the independent PyTorch implementation in
// tools/reference/medicalcnn.py), and its handling of bad input.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "cli_util.h"
#include "data/h5file.h"

using namespace lancet;
using namespace lancet::testing;
namespace fs = std::filesystem;

namespace {

const std::string kFixtures = std::string(LANCET_SOURCE_DIR) + "/tests/fixtures";

std::vector<std::string> fixture_names() {
  std::vector<std::string> names;
  if (!fs::exists(kFixtures)) return names;
  for (const auto& e : fs::directory_iterator(kFixtures)) {
    const std::string f = e.path().filename().string();
    const std::string suffix = "_weights.h5";
    if (f.size() > suffix.size() && f.compare(f.size() - suffix.size(), suffix.size(), suffix) == 0)
      names.push_back(f.substr(0, f.size() - suffix.size()));
  }
  std::sort(names.begin(), names.end());
  return names;
}

// |actual - expected| <= rtol * max(|expected|, floor_frac * max|expected|) element-wise; the
// floor keeps elements that are tiny against the rest of the tensor from demanding absurd
// relative precision. Returns the worst ratio error / allowed.
double worst_ratio(const Tensor& expected, const Tensor& actual, double rtol, double floor_frac = 1e-2) {
  EXPECT_EQ(expected.shape(), actual.shape());
  const float* e = expected.data<float>();
  const float* a = actual.data<float>();
  double maxabs = 0;
  for (int64_t i = 0; i < expected.numel(); ++i) maxabs = std::max(maxabs, std::fabs(static_cast<double>(e[i])));
  double worst = 0;
  for (int64_t i = 0; i < expected.numel(); ++i) {
    const double allowed = rtol * std::max(std::fabs(static_cast<double>(e[i])), floor_frac * maxabs) + 1e-30;
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - e[i]) / allowed);
  }
  return worst;
}

}  // namespace

TEST(ForwardCli, MatchesPyTorchReference) {
  const auto names = fixture_names();
  ASSERT_GE(names.size(), 3u) << "no fixtures in " << kFixtures << " (run tests/reference/make_fixtures.py)";
  TempDir tmp("fwd_ref");
  for (const std::string& name : names) {
    for (const std::string mode : {"eval", "train"}) {
      SCOPED_TRACE(name + " mode " + mode);
      const std::string out = tmp / (name + "_" + mode + ".h5");
      const RunResult r = run_lancet("forward --weights " + kFixtures + "/" + name + "_weights.h5 --input " + kFixtures +
                                     "/" + name + "_batch.h5 --output " + out + " --mode " + mode + " --grads");
      ASSERT_EQ(r.status, 0) << r.output;
      H5File expected = H5File::open_read(kFixtures + "/" + name + "_" + mode + ".h5");
      H5File actual = H5File::open_read(out);
      EXPECT_LE(worst_ratio(expected.read("/logits"), actual.read("/logits"), 1e-4), 1.0) << "logits";
      const float le = *expected.read("/loss").data<float>(), la = *actual.read("/loss").data<float>();
      EXPECT_NEAR(la, le, 1e-4 * std::fabs(le)) << "loss";
      const auto grads = expected.list("/grads");
      ASSERT_FALSE(grads.empty());
      EXPECT_EQ(grads, actual.list("/grads"));
      for (const std::string& g : grads)
        EXPECT_LE(worst_ratio(expected.read("/grads/" + g), actual.read("/grads/" + g), 1e-3), 1.0) << g;
    }
  }
}

TEST(ForwardCli, LowPrecisionEmulationStaysCloseToFp32) {
  const auto names = fixture_names();
  ASSERT_FALSE(names.empty());
  TempDir tmp("fwd_lowp");
  const std::string& name = names.front();
  H5File expected = H5File::open_read(kFixtures + "/" + name + "_eval.h5");
  const Tensor want = expected.read("/logits");
  float peak = 0;
  for (int64_t i = 0; i < want.numel(); ++i) peak = std::max(peak, std::fabs(want.data<float>()[i]));
  // Tolerances as a fraction of the largest logit (fp16: 10 mantissa bits, bf16: 7).
  for (const auto& [precision, tol] : {std::pair<std::string, float>{"fp16", 0.005f}, {"bf16", 0.02f}}) {
    SCOPED_TRACE(precision);
    const std::string out = tmp / (precision + ".h5");
    const RunResult r = run_lancet("forward --weights " + kFixtures + "/" + name + "_weights.h5 --input " + kFixtures +
                                   "/" + name + "_batch.h5 --output " + out + " --precision " + precision);
    ASSERT_EQ(r.status, 0) << r.output;
    const Tensor got = H5File::open_read(out).read("/logits");
    ASSERT_EQ(got.numel(), want.numel());
    float worst = 0;
    bool identical = true;
    for (int64_t i = 0; i < got.numel(); ++i) {
      worst = std::max(worst, std::fabs(got.data<float>()[i] - want.data<float>()[i]));
      identical &= got.data<float>()[i] == want.data<float>()[i];
    }
    EXPECT_LE(worst, tol * peak) << "largest logit " << peak;
    EXPECT_FALSE(identical) << "the low precision must actually round something";
  }
}

class ForwardBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto names = fixture_names();
    ASSERT_FALSE(names.empty());
    weights_ = kFixtures + "/" + names.front() + "_weights.h5";
    batch_ = kFixtures + "/" + names.front() + "_batch.h5";
  }
  // Runs forward expecting failure: non-zero exit, a one-line error containing `needle`,
  // and no output file left behind.
  void expect_error(const std::string& weights, const std::string& input, const std::string& needle,
                    const std::string& extra = "--grads") {
    const std::string out = tmp_ / "out.h5";
    const RunResult r = run_lancet("forward --weights " + weights + " --input " + input + " --output " + out + " " + extra);
    EXPECT_NE(r.status, 0) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << "expected '" << needle << "' in: " << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << "not one line: " << r.output;
    EXPECT_FALSE(fs::exists(out)) << "an output file was left behind";
    for (const auto& e : fs::directory_iterator(tmp_.path)) ADD_FAILURE() << "left behind: " << e.path();
  }
  // A copy of the fixture batch with one dataset replaced.
  std::string batch_with(const std::string& name, const Tensor& t, bool drop_labels = false) {
    const std::string p = tmp_in_ / ("batch_" + std::to_string(counter_++) + ".h5");
    H5File src = H5File::open_read(batch_);
    H5File f = H5File::create_atomic(p);
    f.write("/images", name == "/images" ? t : src.read("/images"));
    if (!drop_labels) f.write("/labels", name == "/labels" ? t : src.read("/labels"));
    f.commit();
    return p;
  }
  TempDir tmp_{"fwd_bad_out"};
  TempDir tmp_in_{"fwd_bad_in"};
  std::string weights_, batch_;
  int counter_ = 0;
};

TEST_F(ForwardBadInput, MissingAndCorruptFiles) {
  expect_error(weights_, tmp_in_ / "nope.h5", "nope.h5");
  const std::string junk = tmp_in_ / "junk.h5";
  std::ofstream(junk) << "this is not HDF5 at all";
  expect_error(weights_, junk, "junk.h5");
  expect_error(junk, batch_, "junk.h5");
}

TEST_F(ForwardBadInput, WrongShapesAndLabels) {
  H5File src = H5File::open_read(batch_);
  const Tensor images = src.read("/images");
  const Tensor labels = src.read("/labels");
  // Rank 3 images.
  expect_error(weights_, batch_with("/images", images.view({images.dim(0) * images.dim(1), images.dim(2), images.dim(3)})),
               "rank 3");
  // Wrong channel count.
  Tensor wrong_c = Tensor::zeros({images.dim(0), images.dim(1) + 1, images.dim(2), images.dim(3)});
  expect_error(weights_, batch_with("/images", wrong_c), "channels");
  // Labels out of range.
  Tensor bad = labels.clone();
  bad.data<int64_t>()[0] = 99;
  expect_error(weights_, batch_with("/labels", bad), "/labels[0] = 99");
  // Missing labels with --grads, but fine without.
  const std::string no_labels = batch_with("", Tensor(), /*drop_labels=*/true);
  expect_error(weights_, no_labels, "/labels");
  EXPECT_EQ(run_lancet("forward --weights " + weights_ + " --input " + no_labels + " --output " + (tmp_in_ / "ok.h5"))
                .status,
            0);
}

TEST_F(ForwardBadInput, WeightsMissingOrMisshapedEntry) {
  H5File src = H5File::open_read(weights_);
  const auto entries = src.list("/model");
  ASSERT_FALSE(entries.empty());
  const auto config = src.get_attr("/model", "model");
  auto copy_weights = [&](const std::string& path, const std::string& skip, const std::string& reshape) {
    H5File f = H5File::create_atomic(path);
    for (const auto& e : entries) {
      if (e == skip) continue;
      Tensor t = src.read("/model/" + e);
      if (e == reshape) t = Tensor::zeros({t.numel() + 1});
      f.write("/model/" + e, t);
    }
    if (config) f.set_attr("/model", "model", *config);
    f.commit();
  };
  const std::string victim = entries[entries.size() / 2];
  copy_weights(tmp_in_ / "missing.h5", victim, "");
  expect_error(tmp_in_ / "missing.h5", batch_, "missing entry /model/" + victim);
  copy_weights(tmp_in_ / "misshaped.h5", "", victim);
  expect_error(tmp_in_ / "misshaped.h5", batch_, "entry /model/" + victim + " has shape");
}
