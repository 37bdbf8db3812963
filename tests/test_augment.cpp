// Augmentation and class-aware samplers (data/augment.h): determinism from (seed, epoch,
// index) whatever the threads, each operation's geometry on synthetic images, the statistics
// of the draws, the samplers' class frequencies and the config's errors.
#include "data/augment.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <thread>

#include "tests/expect_error.h"

namespace lancet {
namespace {

using Json = nlohmann::json;
using testing::expect_error;

template <typename T>
PixelImage<T> random_image(int height, int width, int channels, uint32_t seed) {
  PixelImage<T> img{height, width, channels, {}};
  std::mt19937 rng(seed);
  img.data.resize(static_cast<size_t>(height) * width * channels);
  for (auto& v : img.data) v = static_cast<T>(rng() % (sizeof(T) == 1 ? 256u : 65536u));
  return img;
}

template <typename T>
T at(const PixelImage<T>& img, int y, int x, int c) {
  return img.data[(static_cast<size_t>(y) * img.width + x) * img.channels + c];
}

AugmentConfig everything_on() {
  return AugmentConfig::from_json(Json::parse(R"({"hflip": 0.5, "vflip": 0.5, "rotate_deg": 15,
      "random_resized_crop": {"scale": [0.5, 1.0], "ratio": [0.75, 1.3333]},
      "brightness": 0.2, "contrast": 0.2, "minority_strength": 2})"));
}

AugmentParams whole(int size) {
  AugmentParams p;
  p.crop_w = p.crop_h = size;
  return p;
}

// ---- config ---------------------------------------------------------------------------------

TEST(AugmentConfig, DefaultsAreOffAndJsonRoundTrips) {
  EXPECT_FALSE(AugmentConfig{}.enabled());
  EXPECT_FALSE(AugmentConfig::from_json(Json(nullptr)).enabled());
  EXPECT_FALSE(AugmentConfig::from_json(Json::object()).enabled());
  EXPECT_EQ(AugmentConfig::from_json(AugmentConfig{}.to_json()).to_json(), AugmentConfig{}.to_json());
  EXPECT_TRUE(AugmentConfig{}.to_json()["random_resized_crop"].is_null());

  const AugmentConfig c = everything_on();
  EXPECT_TRUE(c.enabled());
  EXPECT_DOUBLE_EQ(c.hflip, 0.5);
  EXPECT_DOUBLE_EQ(c.rotate_deg, 15);
  EXPECT_TRUE(c.crop);
  EXPECT_DOUBLE_EQ(c.crop_scale[0], 0.5);
  EXPECT_DOUBLE_EQ(c.crop_ratio[1], 1.3333);
  EXPECT_DOUBLE_EQ(c.minority_strength, 2);
  const Json j = c.to_json();
  EXPECT_EQ(AugmentConfig::from_json(j).to_json(), j);
  EXPECT_EQ(AugmentConfig::from_json(Json::parse(j.dump())).to_json(), j);

  // Integers are numbers; a crop object without keys takes torchvision's ranges.
  const AugmentConfig d = AugmentConfig::from_json(Json::parse(R"({"rotate_deg": 10, "random_resized_crop": {}})"));
  EXPECT_DOUBLE_EQ(d.rotate_deg, 10);
  EXPECT_TRUE(d.crop);
  EXPECT_DOUBLE_EQ(d.crop_scale[0], 0.08);
}

TEST(AugmentConfig, BadSettingsNameTheKey) {
  auto parse = [](const char* text) { return [text] { AugmentConfig::from_json(Json::parse(text)); }; };
  expect_error(parse(R"({"hflp": 0.5})"), {"data.augment.hflp", "hflip"});
  expect_error(parse(R"({"hflip": 1.5})"), {"data.augment.hflip", "[0, 1]", "1.5"});
  expect_error(parse(R"({"vflip": -0.1})"), {"data.augment.vflip"});
  expect_error(parse(R"({"rotate_deg": "ten"})"), {"data.augment.rotate_deg", "number"});
  expect_error(parse(R"({"rotate_deg": 200})"), {"data.augment.rotate_deg", "180"});
  expect_error(parse(R"({"brightness": true})"), {"data.augment.brightness", "number"});
  expect_error(parse(R"({"contrast": 2})"), {"data.augment.contrast"});
  expect_error(parse(R"({"minority_strength": -1})"), {"data.augment.minority_strength"});
  expect_error(parse(R"({"random_resized_crop": 0.5})"), {"data.augment.random_resized_crop", "null"});
  expect_error(parse(R"({"random_resized_crop": {"scale": [0.9, 0.5]}})"),
               {"data.augment.random_resized_crop.scale", "[0.9,0.5]"});
  expect_error(parse(R"({"random_resized_crop": {"scale": [0.5, 1.5]}})"), {"data.augment.random_resized_crop.scale"});
  expect_error(parse(R"({"random_resized_crop": {"ratio": [0.75]}})"), {"data.augment.random_resized_crop.ratio"});
  expect_error(parse(R"({"random_resized_crop": {"ratio": [0, 1]}})"), {"data.augment.random_resized_crop.ratio"});
  expect_error(parse(R"({"random_resized_crop": {"size": 3}})"), {"data.augment.random_resized_crop.size", "scale"});
  expect_error(parse(R"([1, 2])"), {"data.augment"});
}

// ---- determinism ----------------------------------------------------------------------------

TEST(Augment, SameInputsSameBytesOtherwiseDifferent) {
  const AugmentConfig cfg = everything_on();
  const auto src = random_image<uint8_t>(40, 48, 3, 1);
  auto run = [&](uint64_t seed, int epoch, int64_t index) {
    auto img = src;
    augment(img, cfg, seed, epoch, index, false, 32);
    EXPECT_EQ(img.height, 32);
    EXPECT_EQ(img.width, 32);
    EXPECT_EQ(img.channels, 3);
    return img.data;
  };
  const auto a = run(7, 3, 11);
  EXPECT_EQ(run(7, 3, 11), a);
  EXPECT_NE(run(7, 4, 11), a);
  EXPECT_NE(run(7, 3, 12), a);
  EXPECT_NE(run(8, 3, 11), a);
}

TEST(Augment, IndependentOfThreadCountAndOrder) {
  const AugmentConfig cfg = everything_on();
  constexpr int n = 64;
  std::vector<PixelImage<uint8_t>> inputs;
  for (int i = 0; i < n; ++i) inputs.push_back(random_image<uint8_t>(36, 36, i % 2 ? 3 : 1, 100u + i));
  auto run = [&](int threads, bool reversed) {
    std::vector<std::vector<uint8_t>> out(n);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (int k = 0; k < n / threads; ++k) {
          const int i = reversed ? n - 1 - (k * threads + t) : k * threads + t;
          auto img = inputs[static_cast<size_t>(i)];
          augment(img, cfg, 2024, 5, i, i % 3 == 0, 28);
          out[static_cast<size_t>(i)] = img.data;
        }
      });
    }
    for (auto& th : pool) th.join();
    return out;
  };
  const auto serial = run(1, false);
  EXPECT_EQ(run(4, false), serial);
  EXPECT_EQ(run(4, true), serial);
  EXPECT_EQ(run(1, true), serial);
}

// ---- geometry -------------------------------------------------------------------------------

template <typename T>
void check_flips(int channels) {
  const auto sq = random_image<T>(11, 11, channels, 4);
  for (int mode = 0; mode < 3; ++mode) {
    AugmentParams p = whole(11);
    p.hflip = mode != 1;
    p.vflip = mode != 0;
    auto img = sq;
    apply_augment(img, p, 11);
    for (int y = 0; y < 11; ++y)
      for (int x = 0; x < 11; ++x)
        for (int c = 0; c < channels; ++c)
          ASSERT_EQ(at(img, y, x, c), at(sq, p.vflip ? 10 - y : y, p.hflip ? 10 - x : x, c))
              << "mode " << mode << " at " << y << "," << x << "," << c;
  }
}

TEST(Augment, FlipsMirror) {
  check_flips<uint8_t>(1);
  check_flips<uint8_t>(3);
  check_flips<uint16_t>(1);
}

TEST(Augment, NeutralParamsAreIdentity) {
  const auto g8 = random_image<uint8_t>(17, 17, 1, 5);
  const auto c8 = random_image<uint8_t>(17, 17, 3, 6);
  const auto g16 = random_image<uint16_t>(17, 17, 1, 7);
  auto a = g8, b = c8;
  auto d = g16;
  apply_augment(a, whole(17), 17);  // angle 0, brightness and contrast 1, whole-image crop
  apply_augment(b, whole(17), 17);
  apply_augment(d, whole(17), 17);
  EXPECT_EQ(a.data, g8.data);
  EXPECT_EQ(b.data, c8.data);
  EXPECT_EQ(d.data, g16.data);
  // A config with everything off leaves an image of the output size unchanged.
  auto e = c8;
  augment(e, AugmentConfig{}, 1, 0, 0, true, 17);
  EXPECT_EQ(e.data, c8.data);
}

TEST(Augment, RotationByNinetyDegreesTurnsCounterClockwise) {
  const auto src = random_image<uint8_t>(15, 15, 1, 8);
  AugmentParams p = whole(15);
  p.angle_deg = 90;
  auto img = src;
  apply_augment(img, p, 15);
  int off = 0;
  for (int y = 0; y < 15; ++y)
    for (int x = 0; x < 15; ++x) off += std::abs(at(img, y, x, 0) - at(src, x, 14 - y, 0)) > 1;
  EXPECT_EQ(off, 0);
}

TEST(Augment, FullScaleSquareCropIsAPlainResize) {
  const auto src = random_image<uint8_t>(40, 40, 3, 9);
  const AugmentConfig crop =
      AugmentConfig::from_json(Json::parse(R"({"random_resized_crop": {"scale": [1, 1], "ratio": [1, 1]}})"));
  for (int64_t i = 0; i < 5; ++i) {
    const AugmentParams p = draw_augment_params(crop, 3, 0, i, false, 40, 40);
    EXPECT_EQ(p.crop_x, 0);
    EXPECT_EQ(p.crop_y, 0);
    EXPECT_EQ(p.crop_w, 40);
    EXPECT_EQ(p.crop_h, 40);
    auto a = src, b = src, c = src;
    augment(a, crop, 3, 0, i, false, 24);
    augment(b, AugmentConfig{}, 3, 0, i, false, 24);
    EXPECT_EQ(a.data, b.data);
    augment(c, crop, 3, 0, i, false, 40);
    EXPECT_EQ(c.data, src.data);
  }
}

TEST(Augment, CropFallsBackToACentreCrop) {
  // A 2:1 aspect of the whole 20x20 area never fits: the fallback keeps the width and
  // takes the nearest allowed ratio about the centre, like torchvision.
  const AugmentConfig cfg =
      AugmentConfig::from_json(Json::parse(R"({"random_resized_crop": {"scale": [1, 1], "ratio": [2, 2]}})"));
  const AugmentParams p = draw_augment_params(cfg, 1, 0, 0, false, 20, 20);
  EXPECT_EQ(p.crop_w, 20);
  EXPECT_EQ(p.crop_h, 10);
  EXPECT_EQ(p.crop_x, 0);
  EXPECT_EQ(p.crop_y, 5);
  // 20x10 stretched to 20x20 (bilinear, edge rows clamped): the first and last output rows
  // are source rows 5 and 14.
  auto img = random_image<uint8_t>(20, 20, 1, 2);
  const auto src = img;
  apply_augment(img, p, 20);
  ASSERT_EQ(img.height, 20);
  for (int x = 0; x < 20; ++x) {
    EXPECT_EQ(at(img, 0, x, 0), at(src, 5, x, 0)) << x;
    EXPECT_EQ(at(img, 19, x, 0), at(src, 14, x, 0)) << x;
  }
}

TEST(Augment, CropsStayInsideWithinTheScaleAndRatioRanges) {
  const AugmentConfig cfg = everything_on();
  for (int64_t i = 0; i < 500; ++i) {
    const AugmentParams p = draw_augment_params(cfg, 9, 1, i, false, 60, 80);
    ASSERT_GE(p.crop_x, 0);
    ASSERT_GE(p.crop_y, 0);
    ASSERT_LE(p.crop_x + p.crop_w, 80);
    ASSERT_LE(p.crop_y + p.crop_h, 60);
    const double area = static_cast<double>(p.crop_w) * p.crop_h / (60.0 * 80.0);
    EXPECT_GT(area, 0.45);  // scale [0.5, 1] up to rounding of w and h
    const double ratio = static_cast<double>(p.crop_w) / p.crop_h;
    EXPECT_GT(ratio, 0.7);
    EXPECT_LT(ratio, 1.4);
  }
}

TEST(Augment, BrightnessAndContrastSaturate) {
  PixelImage<uint8_t> g8{2, 2, 1, {0, 100, 200, 255}};
  AugmentParams p = whole(2);
  p.brightness = 2;
  apply_augment(g8, p, 2);
  EXPECT_EQ(g8.data, (std::vector<uint8_t>{0, 200, 255, 255}));

  PixelImage<uint16_t> g16{2, 2, 1, {0, 1000, 40000, 65535}};
  apply_augment(g16, p, 2);
  EXPECT_EQ(g16.data, (std::vector<uint16_t>{0, 2000, 65535, 65535}));

  // Contrast 0 blends fully to the mean (of the gray image: 0.299 R + 0.587 G + 0.114 B).
  PixelImage<uint8_t> sq{2, 2, 3, {100, 0, 0, 100, 0, 0, 100, 0, 0, 100, 0, 0}};
  AugmentParams c = whole(2);
  c.contrast = 0;
  apply_augment(sq, c, 2);
  for (uint8_t v : sq.data) EXPECT_EQ(v, 30);  // round(0.299 * 100)
}

// ---- statistics of the draws ------------------------------------------------------------------

TEST(Augment, DrawStatistics) {
  const AugmentConfig cfg = AugmentConfig::from_json(
      Json::parse(R"({"hflip": 0.5, "rotate_deg": 10, "brightness": 0.1, "minority_strength": 2})"));
  int flips = 0;
  double lo = 0, hi = 0, mlo = 0, mhi = 0;
  for (int64_t i = 0; i < 2000; ++i) {
    const AugmentParams p = draw_augment_params(cfg, 42, 0, i, false, 32, 32);
    flips += p.hflip;
    EXPECT_FALSE(p.vflip);
    ASSERT_GE(p.angle_deg, -10);
    ASSERT_LE(p.angle_deg, 10);
    ASSERT_GE(p.brightness, 0.9);
    ASSERT_LE(p.brightness, 1.1);
    EXPECT_EQ(p.contrast, 1);
    lo = std::min(lo, p.angle_deg);
    hi = std::max(hi, p.angle_deg);
    // Minority samples: the ranges doubled, the flip probability unchanged.
    const AugmentParams m = draw_augment_params(cfg, 42, 0, i, true, 32, 32);
    EXPECT_EQ(m.hflip, p.hflip);
    ASSERT_GE(m.angle_deg, -20);
    ASSERT_LE(m.angle_deg, 20);
    ASSERT_GE(m.brightness, 0.8);
    ASSERT_LE(m.brightness, 1.2);
    mlo = std::min(mlo, m.angle_deg);
    mhi = std::max(mhi, m.angle_deg);
  }
  EXPECT_GE(flips, 900);
  EXPECT_LE(flips, 1100);
  EXPECT_LT(lo, -9.5);
  EXPECT_GT(hi, 9.5);
  EXPECT_LT(mlo, -19);
  EXPECT_GT(mhi, 19);

  // With strength 1 a minority sample draws exactly what any other does.
  AugmentConfig one = everything_on();
  one.minority_strength = 1;
  for (int64_t i = 0; i < 50; ++i) {
    const AugmentParams a = draw_augment_params(one, 5, 2, i, false, 50, 70);
    const AugmentParams b = draw_augment_params(one, 5, 2, i, true, 50, 70);
    EXPECT_EQ(a.crop_x, b.crop_x);
    EXPECT_EQ(a.crop_w, b.crop_w);
    EXPECT_EQ(a.angle_deg, b.angle_deg);
    EXPECT_EQ(a.contrast, b.contrast);
  }
}

// ---- samplers ---------------------------------------------------------------------------------

TEST(Samplers, ClassBalancedOrderDrawsClassesEqually) {
  std::vector<int64_t> labels(900, 0);
  labels.insert(labels.end(), 100, 1);
  std::shuffle(labels.begin(), labels.end(), std::mt19937(3));
  const auto order = class_balanced_order(labels, 2, 11, 0, 10000);
  ASSERT_EQ(order.size(), 10000u);
  int64_t ones = 0;
  std::vector<int> seen(labels.size(), 0);
  for (int64_t i : order) {
    ASSERT_GE(i, 0);
    ASSERT_LT(i, 1000);
    ones += labels[static_cast<size_t>(i)];
    ++seen[static_cast<size_t>(i)];
  }
  EXPECT_GT(ones, 4700);
  EXPECT_LT(ones, 5300);
  // Within the minority class every sample is drawn (about 50 times each).
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] == 1) {
      EXPECT_GT(seen[i], 20) << i;
    }
  }
  EXPECT_EQ(class_balanced_order(labels, 2, 11, 0, 10000), order);
  EXPECT_NE(class_balanced_order(labels, 2, 11, 1, 10000), order);
  EXPECT_NE(class_balanced_order(labels, 2, 12, 0, 10000), order);
  // An empty class is never drawn; the others share equally.
  const auto three = class_balanced_order(labels, 3, 11, 0, 3000);
  for (int64_t i : three) EXPECT_LT(labels[static_cast<size_t>(i)], 2);
  EXPECT_TRUE(class_balanced_order(labels, 2, 1, 0, 0).empty());
}

TEST(Samplers, OversampleMinorityCountsAreExact) {
  std::vector<int64_t> labels(900, 0);
  labels.insert(labels.end(), 100, 1);
  const auto order = oversample_minority(labels, 2, 5, 0);
  ASSERT_EQ(order.size(), 1800u);
  std::vector<int> seen(labels.size(), 0);
  for (int64_t i : order) ++seen[static_cast<size_t>(i)];
  for (size_t i = 0; i < labels.size(); ++i) EXPECT_EQ(seen[i], labels[i] == 0 ? 1 : 9) << i;
  EXPECT_FALSE(std::is_sorted(order.begin(), order.end()));
  EXPECT_EQ(oversample_minority(labels, 2, 5, 0), order);
  EXPECT_NE(oversample_minority(labels, 2, 5, 1), order);

  // 10 / 3 / 0: class 1 needs 10 = 3 + 3 + 3 + 1, so one of its samples appears 4 times.
  const std::vector<int64_t> small{0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0};
  const auto o = oversample_minority(small, 3, 9, 2);
  ASSERT_EQ(o.size(), 20u);
  std::vector<int> count(small.size(), 0), per_class(3, 0);
  for (int64_t i : o) {
    ++count[static_cast<size_t>(i)];
    ++per_class[static_cast<size_t>(small[static_cast<size_t>(i)])];
  }
  EXPECT_EQ(per_class, (std::vector<int>{10, 10, 0}));
  int fours = 0;
  for (size_t i = 0; i < small.size(); ++i) {
    if (small[i] == 0) {
      EXPECT_EQ(count[i], 1);
    }
    if (small[i] == 1) {
      EXPECT_TRUE(count[i] == 3 || count[i] == 4) << count[i];
      fours += count[i] == 4;
    }
  }
  EXPECT_EQ(fours, 1);
}

TEST(Samplers, MinorityClassesAndErrors) {
  std::vector<int64_t> labels(900, 0);
  labels.insert(labels.end(), 100, 1);
  labels.insert(labels.end(), 600, 2);
  EXPECT_EQ(minority_classes(labels, 4), (std::vector<bool>{false, true, false, true}));
  EXPECT_EQ(minority_classes(labels, 4, 0.7), (std::vector<bool>{false, true, true, true}));
  EXPECT_EQ(minority_classes(labels, 4, 0.0), (std::vector<bool>{false, false, false, false}));

  expect_error([&] { minority_classes(labels, 2); }, {"minority_classes", "label 2 of sample 1000", "[0, 2)"});
  expect_error([&] { minority_classes(labels, 3, 1.5); }, {"threshold", "1.5"});
  expect_error([] { class_balanced_order({}, 2, 0, 0, 10); }, {"class_balanced_order", "no samples"});
  expect_error([&] { class_balanced_order(labels, 3, 0, 0, -1); }, {"length", "-1"});
  expect_error([] { oversample_minority({0, -1}, 2, 0, 0); }, {"oversample_minority", "label -1 of sample 1"});
  expect_error([] { oversample_minority({0}, 0, 0, 0); }, {"num_classes", "0"});
  auto img = random_image<uint8_t>(8, 8, 2, 1);
  expect_error([&] { augment(img, AugmentConfig{}, 0, 0, 0, false, 8); }, {"augment", "channels"});
  auto ok = random_image<uint8_t>(8, 8, 1, 1);
  expect_error([&] { augment(ok, AugmentConfig{}, 0, 0, 0, false, 0); }, {"out_size", "0"});
  AugmentParams outside = whole(8);
  outside.crop_x = 4;
  expect_error([&] { apply_augment(ok, outside, 8); }, {"crop", "outside"});
}

}  // namespace
}  // namespace lancet
