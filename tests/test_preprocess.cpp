// data/preprocess: every op equals the direct OpenCV call on 8-bit gray, 8-bit RGB and
// 16-bit gray images (odd sizes) and on the real chest X-rays and fundus photo; recipe
// parsing errors, the canonical JSON round trip, fingerprint stability, and concurrent
// application.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <string>
#include <thread>
#include <vector>

#include "data/preprocess.h"
#include "tests/expect_error.h"

namespace fs = std::filesystem;
using namespace lancet;
using lancet::testing::expect_error;

namespace {

const std::string kRealDir = std::string(LANCET_SOURCE_DIR) + "/tests/data/real/png_jpeg/";

// Smooth structure plus noise, values in [lo, hi], so every op has something to change.
cv::Mat make_image(int rows, int cols, int type, double lo, double hi, uint64_t seed) {
  cv::Mat m(rows, cols, type);
  cv::RNG rng(seed);
  rng.fill(m, cv::RNG::UNIFORM, cv::Scalar::all(lo), cv::Scalar::all((lo + hi) / 2));
  cv::Mat ramp(rows, cols, type);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols * m.channels(); ++c) {
      const double v = (hi - lo) / 2 * (r + c) / (rows + cols * m.channels());
      if (m.depth() == CV_8U) ramp.ptr<uint8_t>(r)[c] = cv::saturate_cast<uint8_t>(v);
      else ramp.ptr<uint16_t>(r)[c] = cv::saturate_cast<uint16_t>(v);
    }
  return m + ramp;
}

cv::Mat gray8() { return make_image(37, 53, CV_8UC1, 20, 230, 1); }
cv::Mat rgb8() { return make_image(41, 29, CV_8UC3, 10, 240, 2); }
cv::Mat gray16() { return make_image(33, 47, CV_16UC1, 100, 4000, 3); }  // 12-bit content

void expect_same(const cv::Mat& actual, const cv::Mat& expected, const std::string& what) {
  ASSERT_EQ(cv::typeToString(actual.type()), cv::typeToString(expected.type())) << what;
  ASSERT_EQ(actual.size(), expected.size()) << what;
  EXPECT_EQ(cv::countNonZero(actual.reshape(1) != expected.reshape(1)), 0) << what << ": pixels differ";
}

PreprocessRecipe recipe(const std::string& json) { return PreprocessRecipe::from_json(Json::parse(json)); }

cv::Mat apply(const PreprocessRecipe& r, const cv::Mat& in) {
  cv::Mat m = in;
  r.apply(m);
  return m;
}

// ---- direct OpenCV references ------------------------------------------------------------

int interp_for(const cv::Mat& in, cv::Size to) {
  return to.width <= in.cols && to.height <= in.rows ? cv::INTER_AREA : cv::INTER_LINEAR;
}

cv::Mat direct_resize(const cv::Mat& in, int s) {
  cv::Mat out;
  cv::resize(in, out, cv::Size(s, s), 0, 0, interp_for(in, cv::Size(s, s)));
  return out;
}

cv::Mat direct_clahe(const cv::Mat& in, double clip, int grid) {
  cv::Ptr<cv::CLAHE> clahe = cv::createCLAHE(clip, cv::Size(grid, grid));
  cv::Mat out;
  if (in.channels() == 1) {
    clahe->apply(in, out);
    return out;
  }
  cv::Mat lab;
  cv::cvtColor(in, lab, cv::COLOR_RGB2Lab);
  std::vector<cv::Mat> planes;
  cv::split(lab, planes);
  clahe->apply(planes[0], planes[0]);
  cv::merge(planes, lab);
  cv::cvtColor(lab, out, cv::COLOR_Lab2RGB);
  return out;
}

cv::Mat direct_gamma(const cv::Mat& in, double gamma) {
  cv::Mat out;
  if (in.depth() == CV_8U) {
    cv::Mat lut(1, 256, CV_8U);
    for (int v = 0; v < 256; ++v) lut.at<uint8_t>(v) = cv::saturate_cast<uint8_t>(std::pow(v / 255.0, gamma) * 255.0);
    cv::LUT(in, lut, out);
    return out;
  }
  out.create(in.size(), in.type());
  for (int r = 0; r < in.rows; ++r)
    for (int c = 0; c < in.cols * in.channels(); ++c)
      out.ptr<uint16_t>(r)[c] = cv::saturate_cast<uint16_t>(std::pow(in.ptr<uint16_t>(r)[c] / 65535.0, gamma) * 65535.0);
  return out;
}

cv::Mat direct_median(const cv::Mat& in, int k) {
  cv::Mat out;
  cv::medianBlur(in, out, k);
  return out;
}

cv::Mat direct_gaussian(const cv::Mat& in, int k, double sigma) {
  cv::Mat out;
  cv::GaussianBlur(in, out, cv::Size(k, k), sigma);
  return out;
}

const void* buffer(const cv::Mat& m) { return m.data; }

double max_value(const cv::Mat& in) { return in.depth() == CV_8U ? 255.0 : 65535.0; }

cv::Mat direct_minmax(const cv::Mat& in) {
  cv::Mat out;
  cv::normalize(in, out, 0, max_value(in), cv::NORM_MINMAX);
  return out;
}

// Percentiles by sorting every channel value: the rank round(p / 100 * (N - 1)).
cv::Mat direct_percentile_stretch(const cv::Mat& in, double lo_p, double hi_p) {
  cv::Mat flat;
  in.clone().reshape(1, 1).convertTo(flat, CV_64F);
  std::vector<double> v(flat.begin<double>(), flat.end<double>());
  std::sort(v.begin(), v.end());
  const double n1 = static_cast<double>(v.size() - 1);
  const double lo = v[static_cast<size_t>(std::llround(lo_p / 100 * n1))];
  const double hi = v[static_cast<size_t>(std::llround(hi_p / 100 * n1))];
  const double scale = max_value(in) * (1.0 / (hi - lo));
  cv::Mat out;
  in.convertTo(out, -1, scale, 0.0 - lo * scale);
  return out;
}

cv::Mat direct_cvt(const cv::Mat& in, int code, int from_channels) {
  if (in.channels() != from_channels) return in;
  cv::Mat out;
  cv::cvtColor(in, out, code);
  return out;
}

// One op as JSON and its direct OpenCV equivalent.
struct OpCase {
  const char* json;
  std::function<cv::Mat(const cv::Mat&)> direct;
};

std::vector<OpCase> op_cases() {
  return {
      {R"({"op":"resize","size":16})", [](const cv::Mat& m) { return direct_resize(m, 16); }},
      {R"({"op":"resize","size":101})", [](const cv::Mat& m) { return direct_resize(m, 101); }},
      {R"({"op":"resize","size":45})", [](const cv::Mat& m) { return direct_resize(m, 45); }},
      {R"({"op":"clahe"})", [](const cv::Mat& m) { return direct_clahe(m, 2.0, 8); }},
      {R"({"op":"clahe","clip_limit":4.5,"tile_grid":3})", [](const cv::Mat& m) { return direct_clahe(m, 4.5, 3); }},
      {R"({"op":"gamma","gamma":0.8})", [](const cv::Mat& m) { return direct_gamma(m, 0.8); }},
      {R"({"op":"gamma","gamma":2.2})", [](const cv::Mat& m) { return direct_gamma(m, 2.2); }},
      {R"({"op":"median_blur"})", [](const cv::Mat& m) { return direct_median(m, 3); }},
      {R"({"op":"median_blur","ksize":5})", [](const cv::Mat& m) { return direct_median(m, 5); }},
      {R"({"op":"gaussian_blur","ksize":5,"sigma":1.0})", [](const cv::Mat& m) { return direct_gaussian(m, 5, 1.0); }},
      {R"({"op":"gaussian_blur"})", [](const cv::Mat& m) { return direct_gaussian(m, 5, 0.0); }},
      {R"({"op":"gaussian_blur","ksize":7,"sigma":2.5})", [](const cv::Mat& m) { return direct_gaussian(m, 7, 2.5); }},
      {R"({"op":"contrast_normalize"})", direct_minmax},
      {R"({"op":"contrast_normalize","percentiles":[0,100]})", direct_minmax},
      {R"({"op":"contrast_normalize","percentiles":[1,99]})",
       [](const cv::Mat& m) { return direct_percentile_stretch(m, 1, 99); }},
      {R"({"op":"contrast_normalize","percentiles":[2.5,90]})",
       [](const cv::Mat& m) { return direct_percentile_stretch(m, 2.5, 90); }},
      {R"({"op":"to_gray"})", [](const cv::Mat& m) { return direct_cvt(m, cv::COLOR_RGB2GRAY, 3); }},
      {R"({"op":"to_rgb"})", [](const cv::Mat& m) { return direct_cvt(m, cv::COLOR_GRAY2RGB, 1); }},
  };
}

// Every op case on `img` equals its direct call, and leaves img's pixels untouched. CLAHE on
// 16-bit images is not cv::CLAHE's (Preprocess.Clahe16HasThe8BitMeaning checks it).
void check_all_ops(const cv::Mat& img, const std::string& name) {
  const cv::Mat original = img.clone();
  for (const auto& c : op_cases()) {
    if (img.depth() == CV_16U && std::string(c.json).find("clahe") != std::string::npos) continue;
    const cv::Mat got = apply(recipe(std::string("[") + c.json + "]"), img);
    expect_same(got, c.direct(img), name + " " + c.json);
    expect_same(img, original, name + " input after " + c.json);
  }
}

// The real images as the loader would hand them over: RGB order, stored depth.
struct RealImage {
  std::string name;
  cv::Mat image;
};

std::vector<RealImage> real_images() {
  std::vector<RealImage> out;
  for (const char* f : {"txv__nih_00000001_000.png", "txv__nih_00027426_000.png",
                        "napari__fundus_normal_right_eye_600px.jpg"}) {
    cv::Mat m = cv::imread(std::string(kRealDir) + f, cv::IMREAD_UNCHANGED);
    EXPECT_FALSE(m.empty()) << "cannot read " << kRealDir << f;
    if (m.empty()) continue;
    if (m.channels() == 3) cv::cvtColor(m, m, cv::COLOR_BGR2RGB);
    out.push_back({f, m});
  }
  return out;
}

const char* kExampleRecipe = R"([
  {"op":"resize","size":224,"keep_aspect":true},
  {"op":"clahe","clip_limit":2.0,"tile_grid":8},
  {"op":"gamma","gamma":0.8},
  {"op":"median_blur","ksize":3},
  {"op":"gaussian_blur","ksize":5,"sigma":1.0},
  {"op":"contrast_normalize","percentiles":[1,99]},
  {"op":"to_gray"}
])";

// kExampleRecipe as a chain of direct calls.
cv::Mat direct_example(const cv::Mat& in) {
  const int s = 224;
  cv::Mat m;
  const int nw = in.cols >= in.rows ? s : static_cast<int>(std::lround(double(in.cols) * s / in.rows));
  const int nh = in.cols >= in.rows ? static_cast<int>(std::lround(double(in.rows) * s / in.cols)) : s;
  cv::resize(in, m, cv::Size(nw, nh), 0, 0, interp_for(in, cv::Size(nw, nh)));
  cv::copyMakeBorder(m, m, (s - nh) / 2, s - nh - (s - nh) / 2, (s - nw) / 2, s - nw - (s - nw) / 2,
                     cv::BORDER_CONSTANT, cv::Scalar::all(0));
  m = direct_clahe(m, 2.0, 8);
  m = direct_gamma(m, 0.8);
  m = direct_median(m, 3);
  m = direct_gaussian(m, 5, 1.0);
  m = direct_percentile_stretch(m, 1, 99);
  return direct_cvt(m, cv::COLOR_RGB2GRAY, 3);
}

}  // namespace

// ---- ops against direct OpenCV calls ---------------------------------------------------------

TEST(Preprocess, OpsEqualDirectOpenCVOnGray8) { check_all_ops(gray8(), "gray8"); }
TEST(Preprocess, OpsEqualDirectOpenCVOnRgb8) { check_all_ops(rgb8(), "rgb8"); }
TEST(Preprocess, OpsEqualDirectOpenCVOnGray16) { check_all_ops(gray16(), "gray16"); }

TEST(Preprocess, OpsEqualDirectOpenCVOnFullRange16BitAndNonContinuousInput) {
  check_all_ops(make_image(29, 31, CV_16UC1, 0, 65535, 4), "gray16 full range");
  // A region of interest: rows are not contiguous.
  const cv::Mat big = make_image(60, 70, CV_8UC3, 0, 255, 5);
  check_all_ops(big(cv::Rect(3, 5, 33, 27)), "rgb8 roi");
}

TEST(Preprocess, ResizeKeepAspectPadsACentredSquare) {
  // 41 rows x 29 cols -> longer side 20: 14 x 20 by INTER_AREA, 3 columns of pad each side.
  const cv::Mat in = rgb8();
  cv::Mat expected;
  cv::resize(in, expected, cv::Size(14, 20), 0, 0, cv::INTER_AREA);
  cv::copyMakeBorder(expected, expected, 0, 0, 3, 3, cv::BORDER_CONSTANT, cv::Scalar::all(7));
  expect_same(apply(recipe(R"([{"op":"resize","size":20,"keep_aspect":true,"pad_value":7}])"), in), expected, "rgb8");

  // 37 x 53 -> 64: enlarged (INTER_LINEAR) to 45 x 64; 19 rows of pad, 9 on top, 10 below.
  const cv::Mat g = gray8();
  cv::resize(g, expected, cv::Size(64, 45), 0, 0, cv::INTER_LINEAR);
  cv::copyMakeBorder(expected, expected, 9, 10, 0, 0, cv::BORDER_CONSTANT, cv::Scalar::all(0));
  expect_same(apply(recipe(R"([{"op":"resize","size":64,"keep_aspect":true}])"), g), expected, "gray8");

  // pad_value is an 8-bit level at every depth: 16-bit images are padded with pad_value * 257.
  const cv::Mat g16 = gray16();  // 33 x 47 -> 22 x 32 (area), 5 rows of pad above and below
  cv::resize(g16, expected, cv::Size(32, 22), 0, 0, cv::INTER_AREA);
  cv::copyMakeBorder(expected, expected, 5, 5, 0, 0, cv::BORDER_CONSTANT, cv::Scalar::all(200 * 257));
  expect_same(apply(recipe(R"([{"op":"resize","size":32,"keep_aspect":true,"pad_value":200}])"), g16), expected,
              "gray16");

  // Already the right size: unchanged, same buffer.
  const cv::Mat sq = make_image(24, 24, CV_8UC1, 0, 255, 6);
  const cv::Mat same = apply(recipe(R"([{"op":"resize","size":24}])"), sq);
  EXPECT_EQ(buffer(same), buffer(sq));
}

TEST(Preprocess, PadValueIsTheSameGreyAtEitherDepth) {
  // One recipe, an 8-bit image and its exact 16-bit version (v * 257, as data.bit_depth 16
  // widens 8-bit files): padding then widening equals widening then padding, and narrowing
  // the padded 16-bit image (v / 257) gives the padded 8-bit one, so 8-bit files, 16-bit files
  // and DICOMs (windowed to 8 or 16 bits) are padded alike. 255 was black on 16 bits before.
  const cv::Mat g8 = make_image(30, 50, CV_8UC1, 0, 255, 11);
  cv::Mat g16;
  g8.convertTo(g16, CV_16U, 257.0);
  for (int pad : {0, 1, 128, 255}) {
    const PreprocessRecipe r =
        recipe(R"([{"op":"resize","size":50,"keep_aspect":true,"pad_value":)" + std::to_string(pad) + "}]");
    const cv::Mat p8 = apply(r, g8), p16 = apply(r, g16);
    ASSERT_EQ(p16.size(), cv::Size(50, 50));
    EXPECT_EQ(p16.at<uint16_t>(0, 0), pad * 257) << pad;
    EXPECT_EQ(p8.at<uint8_t>(0, 0), pad) << pad;
    cv::Mat widened, narrowed;
    p8.convertTo(widened, CV_16U, 257.0);
    p16.convertTo(narrowed, CV_8U, 1.0 / 257.0);
    expect_same(widened, p16, "pad " + std::to_string(pad) + ": padded then widened");
    expect_same(narrowed, p8, "pad " + std::to_string(pad) + ": padded then narrowed");
  }
}

TEST(Preprocess, ContrastNormalizeStretchesToTheFullRangeAndKeepsConstantImages) {
  const cv::Mat g = gray8();
  double lo = 0, hi = 0;
  cv::minMaxLoc(apply(recipe(R"([{"op":"contrast_normalize"}])"), g), &lo, &hi);
  EXPECT_EQ(lo, 0);
  EXPECT_EQ(hi, 255);
  cv::minMaxLoc(apply(recipe(R"([{"op":"contrast_normalize"}])"), gray16()), &lo, &hi);
  EXPECT_EQ(lo, 0);
  EXPECT_EQ(hi, 65535);
  const cv::Mat flat(9, 11, CV_16UC1, cv::Scalar(1234));
  expect_same(apply(recipe(R"([{"op":"contrast_normalize","percentiles":[5,95]}])"), flat), flat, "constant");
}

TEST(Preprocess, ToGrayAndToRgbConvertOrKeep) {
  const cv::Mat g = gray8(), c = rgb8();
  EXPECT_EQ(apply(recipe(R"([{"op":"to_gray"}])"), c).type(), CV_8UC1);
  EXPECT_EQ(apply(recipe(R"([{"op":"to_rgb"}])"), g).type(), CV_8UC3);
  EXPECT_EQ(apply(recipe(R"([{"op":"to_rgb"}])"), gray16()).type(), CV_16UC3);
  EXPECT_EQ(buffer(apply(recipe(R"([{"op":"to_gray"}])"), g)), buffer(g));
  EXPECT_EQ(buffer(apply(recipe(R"([{"op":"to_rgb"}])"), c)), buffer(c));
  // RGB order: a pure red pixel weighs 0.299, not the 0.114 of blue.
  const cv::Mat red(1, 1, CV_8UC3, cv::Scalar(255, 0, 0));
  EXPECT_EQ(apply(recipe(R"([{"op":"to_gray"}])"), red).at<uint8_t>(0), 76);
}

TEST(Preprocess, ChainEqualsDirectCallsInOrder) {
  const PreprocessRecipe r = PreprocessRecipe::from_json(Json::parse(kExampleRecipe));
  for (const cv::Mat& img : {gray8(), rgb8(), make_image(300, 257, CV_8UC3, 0, 255, 7)})
    expect_same(apply(r, img), direct_example(img), "example recipe");
  EXPECT_TRUE(PreprocessRecipe().empty());
  const cv::Mat g = gray8();
  EXPECT_EQ(buffer(apply(PreprocessRecipe(), g)), buffer(g));
}

// ---- the real images ---------------------------------------------------------------------

TEST(Preprocess, OpsEqualDirectOpenCVOnRealImages) {
  if (!fs::is_directory(kRealDir)) GTEST_SKIP() << "real images not found at " << kRealDir;
  const auto images = real_images();
  ASSERT_EQ(images.size(), 3u);
  EXPECT_EQ(images[0].image.type(), CV_8UC1);
  EXPECT_EQ(images[2].image.type(), CV_8UC3);
  for (const auto& [name, img] : images) {
    check_all_ops(img, name);
    expect_same(apply(PreprocessRecipe::from_json(Json::parse(kExampleRecipe)), img), direct_example(img),
                name + " example recipe");
  }
  // A 16-bit version of a radiograph (as a 16-bit PNG or DICOM would arrive).
  cv::Mat cxr16;
  images[0].image.convertTo(cxr16, CV_16U, 257.0);
  check_all_ops(cxr16, "cxr 16-bit");
}

// CLAHE on 16-bit gray images has its 8-bit meaning (data/preprocess.h): on widened 8-bit
// content (v * 257, as data.bit_depth 16 widens 8-bit files) it is cv::CLAHE's 8-bit result to
// within one level, for several clip limits and grids, sizes the grid divides and sizes it
// does not; and it keeps the detail within an 8-bit level, which the 8-bit operator cannot.
TEST(Preprocess, Clahe16HasThe8BitMeaning) {
  std::vector<std::pair<std::string, cv::Mat>> inputs = {{"gray8", gray8()},
                                                         {"64x64", make_image(64, 64, CV_8UC1, 30, 90, 12)},
                                                         {"noise", make_image(50, 41, CV_8UC1, 0, 255, 13)}};
  const auto real = real_images();
  if (!real.empty()) inputs.emplace_back(real[0].name, real[0].image);
  for (const auto& [name, g8] : inputs)
    for (const auto& [clip, grid] : std::vector<std::pair<double, int>>{{2.0, 8}, {4.5, 3}, {1.0, 5}, {40.0, 2}}) {
      const std::string what = name + " clip " + std::to_string(clip) + " grid " + std::to_string(grid);
      const std::string json = R"([{"op":"clahe","clip_limit":)" + std::to_string(clip) +
                               R"(,"tile_grid":)" + std::to_string(grid) + "}]";
      cv::Mat g16;
      g8.convertTo(g16, CV_16U, 257.0);
      const cv::Mat want = direct_clahe(g8, clip, grid), got = apply(recipe(json), g16);
      ASSERT_EQ(got.type(), CV_16UC1) << what;
      ASSERT_EQ(got.size(), g8.size()) << what;
      double sum = 0;
      int worst = 0;
      for (int y = 0; y < got.rows; ++y)
        for (int x = 0; x < got.cols; ++x) {
          const int d = std::abs(static_cast<int>(std::lround(got.at<uint16_t>(y, x) / 257.0)) - want.at<uint8_t>(y, x));
          worst = std::max(worst, d), sum += d;
        }
      EXPECT_LE(worst, 1) << what;
      EXPECT_LT(sum / static_cast<double>(got.total()), 0.5) << what;
      // And it enhances as much as the 8-bit operator: not cv::CLAHE's 16-bit near no-op.
      EXPECT_GT(cv::norm(want, g8, cv::NORM_L1), 0) << what;
    }
  // A clip limit far above any tile's pixel count clips nothing, as a merely large one does at
  // 8 bits (and overflows nothing).
  {
    cv::Mat g16;
    gray8().convertTo(g16, CV_16U, 257.0);
    const cv::Mat got = apply(recipe(R"([{"op":"clahe","clip_limit":1e12}])"), g16);
    const cv::Mat want = direct_clahe(gray8(), 1000.0, 8);
    for (int y = 0; y < got.rows; ++y)
      for (int x = 0; x < got.cols; ++x)
        ASSERT_LE(std::abs(static_cast<int>(std::lround(got.at<uint16_t>(y, x) / 257.0)) - want.at<uint8_t>(y, x)), 1)
            << y << "," << x;
  }
  // Detail within a level: a ramp over 2000 16-bit values (8 8-bit levels), one tile. The
  // output rises with the input (one curve, read between levels) through far more than the
  // 8 or so values an 8-bit result can take.
  cv::Mat ramp(40, 50, CV_16UC1);
  for (int i = 0; i < 2000; ++i) ramp.at<uint16_t>(i / 50, i % 50) = static_cast<uint16_t>(30000 + i);
  const cv::Mat out = apply(recipe(R"([{"op":"clahe","clip_limit":2.0,"tile_grid":1}])"), ramp);
  std::vector<uint16_t> seen;
  for (int i = 0; i < 2000; ++i) {
    const uint16_t v = out.at<uint16_t>(i / 50, i % 50);
    if (i > 0) {
      ASSERT_GE(v, out.at<uint16_t>((i - 1) / 50, (i - 1) % 50)) << i;
    }
    seen.push_back(v);
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_GT(std::unique(seen.begin(), seen.end()) - seen.begin(), 500);
  EXPECT_GT(out.at<uint16_t>(39, 49) - out.at<uint16_t>(0, 0), 2000);  // stretched, as CLAHE does
}

// ---- errors ----------------------------------------------------------------------------------

TEST(Preprocess, RecipeErrorsNameTheSetting) {
  const auto bad = [](const std::string& json, const std::vector<std::string>& parts) {
    SCOPED_TRACE(json);
    expect_error([&] { PreprocessRecipe::from_json(Json::parse(json)); }, parts);
  };
  bad(R"({"op":"clahe"})", {"data.preprocess:", "list of ops"});
  bad(R"("clahe")", {"data.preprocess:", "list of ops"});
  bad(R"([3])", {"data.preprocess[0]:", "object"});
  bad(R"([{}])", {"data.preprocess[0].op:", "missing"});
  bad(R"([{"op":"blur"}])", {"data.preprocess[0].op:", "unknown op 'blur'", "gaussian_blur"});
  bad(R"([{"op":7}])", {"data.preprocess[0].op:", "unknown op '7'"});
  bad(R"([{"op":"clahe","clip":2}])", {"data.preprocess[0].clip:", "unknown key for clahe", "clip_limit", "tile_grid"});
  bad(R"([{"op":"to_gray","size":3}])", {"data.preprocess[0].size:", "takes no parameters"});
  bad(R"([{"op":"resize"}])", {"data.preprocess[0].size:", "required"});
  bad(R"([{"op":"resize","size":"224"}])", {"data.preprocess[0].size:", "integer", "\"224\""});
  bad(R"([{"op":"resize","size":0}])", {"data.preprocess[0].size:", "got 0"});
  bad(R"([{"op":"resize","size":22.5}])", {"data.preprocess[0].size:", "22.5"});
  bad(R"([{"op":"resize","size":18446744073709551615}])", {"data.preprocess[0].size:", "integer"});
  bad(R"([{"op":"resize","size":9,"keep_aspect":1}])", {"data.preprocess[0].keep_aspect:", "true or false"});
  bad(R"([{"op":"resize","size":9,"pad_value":-1}])", {"data.preprocess[0].pad_value:", "-1"});
  bad(R"([{"op":"resize","size":9,"pad_value":256}])",
      {"data.preprocess[0].pad_value:", "[0, 255] (an 8-bit level at every depth", "pad_value * 257", "256"});
  bad(R"([{"op":"resize","size":9,"pad_value":40000}])", {"data.preprocess[0].pad_value:", "40000"});
  bad(R"([{"op":"clahe","clip_limit":0}])", {"data.preprocess[0].clip_limit:", "> 0"});
  bad(R"([{"op":"clahe","clip_limit":"high"}])", {"data.preprocess[0].clip_limit:", "\"high\""});
  bad(R"([{"op":"clahe","tile_grid":0}])", {"data.preprocess[0].tile_grid:", "got 0"});
  bad(R"([{"op":"gamma","gamma":-0.5}])", {"data.preprocess[0].gamma:", "> 0", "-0.5"});
  bad(R"([{"op":"median_blur","ksize":4}])", {"data.preprocess[0].ksize:", "odd", "4"});
  bad(R"([{"op":"median_blur","ksize":1}])", {"data.preprocess[0].ksize:", "got 1"});
  bad(R"([{"op":"gaussian_blur","ksize":6}])", {"data.preprocess[0].ksize:", "odd"});
  bad(R"([{"op":"gaussian_blur","sigma":-1}])", {"data.preprocess[0].sigma:", ">= 0"});
  for (const char* p : {"[99,1]", "[1]", "[-1,50]", "[1,101]", "[5,5]", "\"1,99\"", "[1,\"99\"]"})
    bad(std::string(R"([{"op":"contrast_normalize","percentiles":)") + p + "}]",
        {"data.preprocess[0].percentiles:", "0 <= low < high <= 100"});
  // The index of the offending op, and a caller-chosen setting name.
  bad(R"([{"op":"to_gray"},{"op":"gamma","gamma":0}])", {"data.preprocess[1].gamma:"});
  expect_error([] { PreprocessRecipe::from_json(Json::parse(R"([{"op":"gamma","gamma":0}])"), "eval.preprocess"); },
               {"eval.preprocess[0].gamma:"});
}

TEST(Preprocess, ApplyErrorsNameTheOpAndCause) {
  const auto bad = [](const std::string& json, const cv::Mat& img, const std::vector<std::string>& parts) {
    SCOPED_TRACE(json);
    const PreprocessRecipe r = recipe(json);
    cv::Mat m = img;
    expect_error([&] { r.apply(m); }, parts);
  };
  bad(R"([{"op":"to_gray"},{"op":"gamma","gamma":0.5}])", cv::Mat(5, 5, CV_8UC4, cv::Scalar::all(1)),
      {"data.preprocess[0] (to_gray)", "unsupported image CV_8UC4"});
  bad(R"([{"op":"gamma","gamma":0.5}])", cv::Mat(5, 5, CV_32FC1, cv::Scalar::all(1)), {"unsupported image CV_32FC1"});
  bad(R"([{"op":"gamma","gamma":0.5}])", cv::Mat(), {"data.preprocess[0] (gamma)", "empty"});
  bad(R"([{"op":"median_blur","ksize":7}])", gray16(), {"data.preprocess[0] (median_blur)", "ksize 7", "16-bit"});
  bad(R"([{"op":"to_rgb"},{"op":"clahe"}])", gray16(), {"data.preprocess[1] (clahe)", "16-bit RGB"});
}

// ---- round trip and fingerprint ----------------------------------------------------------------

TEST(Preprocess, ToJsonIsCanonicalAndRoundTrips) {
  const PreprocessRecipe r = PreprocessRecipe::from_json(Json::parse(kExampleRecipe));
  const Json j = r.to_json();
  ASSERT_EQ(j.size(), 7u);
  EXPECT_EQ(j[0], Json::parse(R"({"op":"resize","size":224,"keep_aspect":true,"pad_value":0})"));
  EXPECT_EQ(j[5], Json::parse(R"({"op":"contrast_normalize","percentiles":[1.0,99.0]})"));
  const PreprocessRecipe back = PreprocessRecipe::from_json(j);
  EXPECT_EQ(back.to_json(), j);
  EXPECT_EQ(back.fingerprint(), r.fingerprint());
  EXPECT_EQ(PreprocessRecipe::from_json(Json::parse(j.dump())).to_json(), j);  // through text

  // Defaults are written out.
  EXPECT_EQ(recipe(R"([{"op":"clahe"},{"op":"gaussian_blur"},{"op":"median_blur"},{"op":"gamma"}])").to_json(),
            Json::parse(R"([{"op":"clahe","clip_limit":2.0,"tile_grid":8},{"op":"gaussian_blur","ksize":5,"sigma":0.0},
                            {"op":"median_blur","ksize":3},{"op":"gamma","gamma":1.0}])"));
  EXPECT_EQ(PreprocessRecipe().to_json(), Json::array());
  EXPECT_EQ(recipe("[]").to_json(), Json::array());
}

TEST(Preprocess, FingerprintIsStable) {
  const std::string fp = recipe(kExampleRecipe).fingerprint();
  EXPECT_TRUE(fp.size() == 20 && fp.rfind("pp2-", 0) == 0 &&
              fp.find_first_not_of("0123456789abcdef", 4) == std::string::npos)
      << fp;
  // Pinned: a change here invalidates every preprocessed cache; bump the changed op's version
  // (op_version in data/preprocess.cpp) instead of editing this value unless the op
  // semantics are unchanged.
  EXPECT_EQ(fp, "pp2-90da70d5e9bc4812");
  // Only recipes whose output changed are at a later version: a padding resize since pad_value
  // became an 8-bit level at every depth, CLAHE since it has its 8-bit meaning on 16-bit
  // images (their packs go stale; the others stay valid).
  for (const char* changed : {R"([{"op":"resize","size":64,"keep_aspect":true,"pad_value":255}])",
                              R"([{"op":"clahe"}])", R"([{"op":"gamma"},{"op":"clahe","tile_grid":4}])"})
    EXPECT_EQ(recipe(changed).fingerprint().substr(0, 4), "pp2-") << changed;
  for (const char* unchanged : {R"([{"op":"resize","size":64,"keep_aspect":true}])",
                                R"([{"op":"resize","size":64,"pad_value":255}])", R"([{"op":"gamma"}])", "[]"})
    EXPECT_EQ(recipe(unchanged).fingerprint().substr(0, 4), "pp1-") << unchanged;
  // Key order, spelled-out defaults and 2 vs 2.0 do not matter.
  EXPECT_EQ(recipe(R"([{"tile_grid":8,"op":"clahe"}])").fingerprint(),
            recipe(R"([{"op":"clahe","clip_limit":2}])").fingerprint());
  EXPECT_EQ(recipe(R"([{"op":"resize","size":64}])").fingerprint(),
            recipe(R"([{"op":"resize","size":64,"keep_aspect":false,"pad_value":0}])").fingerprint());
  // Parameters and op order do.
  std::vector<std::string> fps;
  for (const char* j : {"[]", R"([{"op":"clahe"}])", R"([{"op":"clahe","clip_limit":2.5}])",
                        R"([{"op":"clahe","tile_grid":4}])", R"([{"op":"to_gray"},{"op":"clahe"}])",
                        R"([{"op":"clahe"},{"op":"to_gray"}])", R"([{"op":"gamma","gamma":0.8}])",
                        R"([{"op":"gamma","gamma":0.80001}])"})
    fps.push_back(recipe(j).fingerprint());
  std::sort(fps.begin(), fps.end());
  EXPECT_EQ(std::unique(fps.begin(), fps.end()), fps.end());
  EXPECT_EQ(PreprocessRecipe().fingerprint(), recipe("[]").fingerprint());
}

// ---- concurrency -------------------------------------------------------------------------------

TEST(Preprocess, ConcurrentApplicationGivesIdenticalResults) {
  // One recipe and one input shared by 4 threads, as loader workers share them.
  const PreprocessRecipe r = PreprocessRecipe::from_json(Json::parse(kExampleRecipe));
  const PreprocessRecipe r16 = recipe(R"([{"op":"clahe","clip_limit":3.0,"tile_grid":4},{"op":"gamma","gamma":1.7},
      {"op":"median_blur","ksize":5},{"op":"contrast_normalize","percentiles":[1,99]},{"op":"resize","size":50}])");
  const cv::Mat in = make_image(301, 257, CV_8UC3, 0, 255, 8);
  const cv::Mat in16 = make_image(203, 177, CV_16UC1, 0, 65535, 9);
  const cv::Mat in_copy = in.clone(), in16_copy = in16.clone();
  const cv::Mat expected = apply(r, in), expected16 = apply(r16, in16);

  constexpr int kThreads = 4, kRounds = 12;
  std::vector<std::vector<cv::Mat>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int k = 0; k < kRounds; ++k) {
        got[t].push_back(apply(r, in));
        got[t].push_back(apply(r16, in16));
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t)
    for (int k = 0; k < kRounds; ++k) {
      expect_same(got[t][2 * k], expected, "thread " + std::to_string(t) + " rgb8");
      expect_same(got[t][2 * k + 1], expected16, "thread " + std::to_string(t) + " gray16");
    }
  expect_same(in, in_copy, "shared input");
  expect_same(in16, in16_copy, "shared 16-bit input");
}
