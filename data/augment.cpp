#include "data/augment.h"

#include <algorithm>
#include <cmath>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#include <string>
#include <type_traits>

#include "kernels/error.h"

namespace lancet {

namespace {

using Json = nlohmann::json;

// ---- counter-based random numbers ---------------------------------------------------------
// splitmix64's finaliser as a hash. A generator is a key derived from (seed, stream, epoch,
// index); draw k is hash(key, k). No state advances, so no draw depends on any other.
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Streams keep the augmentation and the samplers' draws apart for the same seed.
enum Stream : uint64_t { kAugmentStream = 1, kBalancedStream = 2, kOversampleStream = 3 };

class CounterRng {
 public:
  CounterRng(uint64_t seed, Stream stream, int epoch, int64_t index)
      : key_(splitmix64(splitmix64(splitmix64(splitmix64(seed) + stream) + static_cast<uint64_t>(epoch)) +
                        static_cast<uint64_t>(index))) {}
  uint64_t bits(uint64_t draw) const { return splitmix64(key_ + splitmix64(draw)); }
  // Uniform in [0, 1), 53 bits.
  double uniform(uint64_t draw) const { return static_cast<double>(bits(draw) >> 11) * 0x1.0p-53; }
  double uniform(uint64_t draw, double lo, double hi) const { return lo + uniform(draw) * (hi - lo); }
  // Uniform in [0, n), n > 0 (multiply-shift; the bias is below n / 2^64).
  uint64_t below(uint64_t draw, uint64_t n) const {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(bits(draw)) * n) >> 64);
  }

 private:
  uint64_t key_;
};

// Fixed draw numbers per operation, so that turning one operation on or off does not change
// what the others draw. The crop uses 4 draws per attempt.
constexpr int kCropAttempts = 10;
enum Draw : uint64_t { kDrawCrop = 0, kDrawHflip = 4 * kCropAttempts, kDrawVflip, kDrawAngle, kDrawBrightness, kDrawContrast };

void shuffle(std::vector<int64_t>& v, const CounterRng& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i - 1, i)]);
}

// ---- config -----------------------------------------------------------------------------------
const char* const kValidKeys = "hflip, vflip, rotate_deg, random_resized_crop, brightness, contrast, minority_strength";

double number(const Json& v, const std::string& key) {
  LANCET_CHECK(v.is_number(), "data.augment." << key << " must be a number, got " << v.dump());
  return v.get<double>();
}

double in_range(const Json& v, const std::string& key, double lo, double hi, const char* what) {
  const double x = number(v, key);
  LANCET_CHECK(x >= lo && x <= hi, "data.augment." << key << " must be " << what << ", got " << v.dump());
  return x;
}

std::array<double, 2> range_pair(const Json& v, const std::string& key, double max, const char* what) {
  const std::string name = "random_resized_crop." + key;
  LANCET_CHECK(v.is_array() && v.size() == 2 && v[0].is_number() && v[1].is_number(),
               "data.augment." << name << " must be [lo, hi] with " << what << ", got " << v.dump());
  const std::array<double, 2> r{v[0].get<double>(), v[1].get<double>()};
  LANCET_CHECK(r[0] > 0 && r[0] <= r[1] && r[1] <= max,
               "data.augment." << name << " must be [lo, hi] with " << what << ", got " << v.dump());
  return r;
}

// The ranges after the minority multiplier.
struct Ranges {
  double rotate, brightness, contrast;
  std::array<double, 2> scale, log_ratio;
};

Ranges effective_ranges(const AugmentConfig& c, bool minority) {
  Ranges r{c.rotate_deg, c.brightness, c.contrast, c.crop_scale,
           {std::log(c.crop_ratio[0]), std::log(c.crop_ratio[1])}};
  const double s = c.minority_strength;
  if (!minority || s == 1) return r;
  r.rotate = std::min(r.rotate * s, 180.0);
  r.brightness = std::min(r.brightness * s, 1.0);
  r.contrast = std::min(r.contrast * s, 1.0);
  // Widen (or narrow) the scale range downwards from its top, and the log-ratio range about
  // its centre; the clamps never cut into what the base config already allows.
  const double hi = r.scale[1];
  r.scale[0] = std::clamp(hi - (hi - r.scale[0]) * s, std::min(r.scale[0], 0.05), hi);
  const double centre = 0.5 * (r.log_ratio[0] + r.log_ratio[1]);
  const double half = 0.5 * (r.log_ratio[1] - r.log_ratio[0]) * s;
  r.log_ratio = {std::max(centre - half, std::min(r.log_ratio[0], std::log(0.25))),
                 std::min(centre + half, std::max(r.log_ratio[1], std::log(4.0)))};
  return r;
}

// torchvision RandomResizedCrop.get_params: 10 attempts, then a centre crop at the nearest
// allowed aspect ratio. Python's round() is round-half-even, as is nearbyint by default.
void draw_crop(const Ranges& r, const CounterRng& rng, int height, int width, AugmentParams& p) {
  const double area = static_cast<double>(height) * width;
  for (int a = 0; a < kCropAttempts; ++a) {
    const uint64_t d = kDrawCrop + 4 * static_cast<uint64_t>(a);
    const double target = area * rng.uniform(d, r.scale[0], r.scale[1]);
    const double aspect = std::exp(rng.uniform(d + 1, r.log_ratio[0], r.log_ratio[1]));
    const int w = static_cast<int>(std::nearbyint(std::sqrt(target * aspect)));
    const int h = static_cast<int>(std::nearbyint(std::sqrt(target / aspect)));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      p.crop_y = static_cast<int>(rng.below(d + 2, static_cast<uint64_t>(height - h + 1)));
      p.crop_x = static_cast<int>(rng.below(d + 3, static_cast<uint64_t>(width - w + 1)));
      p.crop_w = w;
      p.crop_h = h;
      return;
    }
  }
  const double in_ratio = static_cast<double>(width) / height;
  const double rmin = std::exp(r.log_ratio[0]), rmax = std::exp(r.log_ratio[1]);
  int w = width, h = height;
  if (in_ratio < rmin) {
    h = static_cast<int>(std::nearbyint(w / rmin));
  } else if (in_ratio > rmax) {
    w = static_cast<int>(std::nearbyint(h * rmax));
  }
  p.crop_w = std::clamp(w, 1, width);
  p.crop_h = std::clamp(h, 1, height);
  p.crop_x = (width - p.crop_w) / 2;
  p.crop_y = (height - p.crop_h) / 2;
}

std::vector<int64_t> class_counts(const std::vector<int64_t>& labels, int num_classes, const char* what) {
  LANCET_CHECK(num_classes >= 1, what << ": num_classes must be at least 1, got " << num_classes);
  LANCET_CHECK(!labels.empty(), what << ": no samples");
  std::vector<int64_t> counts(static_cast<size_t>(num_classes), 0);
  for (size_t i = 0; i < labels.size(); ++i) {
    LANCET_CHECK(labels[i] >= 0 && labels[i] < num_classes,
                 what << ": label " << labels[i] << " of sample " << i << " is outside [0, " << num_classes << ")");
    ++counts[static_cast<size_t>(labels[i])];
  }
  return counts;
}

std::vector<std::vector<int64_t>> members_by_class(const std::vector<int64_t>& labels, int num_classes) {
  std::vector<std::vector<int64_t>> m(static_cast<size_t>(num_classes));
  for (size_t i = 0; i < labels.size(); ++i) m[static_cast<size_t>(labels[i])].push_back(static_cast<int64_t>(i));
  return m;
}

}  // namespace

// ---- AugmentConfig -------------------------------------------------------------------------

AugmentConfig AugmentConfig::from_json(const Json& j) {
  AugmentConfig c;
  if (j.is_null()) return c;
  LANCET_CHECK(j.is_object(), "data.augment must be a mapping of settings, got " << j.dump());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const Json& v = it.value();
    if (k == "hflip") {
      c.hflip = in_range(v, k, 0, 1, "a probability in [0, 1]");
    } else if (k == "vflip") {
      c.vflip = in_range(v, k, 0, 1, "a probability in [0, 1]");
    } else if (k == "rotate_deg") {
      c.rotate_deg = in_range(v, k, 0, 180, "in [0, 180] degrees");
    } else if (k == "brightness") {
      c.brightness = in_range(v, k, 0, 1, "in [0, 1] (factor in [1 - b, 1 + b])");
    } else if (k == "contrast") {
      c.contrast = in_range(v, k, 0, 1, "in [0, 1] (factor in [1 - c, 1 + c])");
    } else if (k == "minority_strength") {
      c.minority_strength = in_range(v, k, 0, 4, "in [0, 4]");
    } else if (k == "random_resized_crop") {
      if (v.is_null()) continue;
      LANCET_CHECK(v.is_object(), "data.augment.random_resized_crop must be {\"scale\": [lo, hi], \"ratio\": [lo, hi]} "
                                  "or null (off), got " << v.dump());
      c.crop = true;
      for (auto ci = v.begin(); ci != v.end(); ++ci) {
        if (ci.key() == "scale") {
          c.crop_scale = range_pair(ci.value(), "scale", 1.0, "0 < lo <= hi <= 1");
        } else if (ci.key() == "ratio") {
          c.crop_ratio = range_pair(ci.value(), "ratio", 1e9, "0 < lo <= hi");
        } else {
          LANCET_FAIL("unknown setting 'data.augment.random_resized_crop." << ci.key() << "' (valid: scale, ratio)");
        }
      }
    } else {
      LANCET_FAIL("unknown setting 'data.augment." << k << "' (valid: " << kValidKeys << ")");
    }
  }
  return c;
}

Json AugmentConfig::to_json() const {
  Json j;
  j["hflip"] = hflip;
  j["vflip"] = vflip;
  j["rotate_deg"] = rotate_deg;
  j["random_resized_crop"] = crop ? Json{{"scale", crop_scale}, {"ratio", crop_ratio}} : Json(nullptr);
  j["brightness"] = brightness;
  j["contrast"] = contrast;
  j["minority_strength"] = minority_strength;
  return j;
}

bool AugmentConfig::enabled() const {
  return hflip > 0 || vflip > 0 || rotate_deg > 0 || crop || brightness > 0 || contrast > 0;
}

// ---- augmentation ----------------------------------------------------------------------------

AugmentParams draw_augment_params(const AugmentConfig& cfg, uint64_t seed, int epoch, int64_t index, bool minority,
                                  int height, int width) {
  LANCET_CHECK(height >= 1 && width >= 1, "augment: image must be non-empty, got " << height << "x" << width);
  LANCET_CHECK(epoch >= 0 && index >= 0, "augment: epoch and index must be >= 0, got " << epoch << ", " << index);
  const CounterRng rng(seed, kAugmentStream, epoch, index);
  const Ranges r = effective_ranges(cfg, minority);
  AugmentParams p;
  p.crop_w = width;
  p.crop_h = height;
  if (cfg.crop) draw_crop(r, rng, height, width, p);
  p.hflip = rng.uniform(kDrawHflip) < cfg.hflip;
  p.vflip = rng.uniform(kDrawVflip) < cfg.vflip;
  if (r.rotate > 0) p.angle_deg = rng.uniform(kDrawAngle, -r.rotate, r.rotate);
  if (r.brightness > 0) p.brightness = rng.uniform(kDrawBrightness, 1 - r.brightness, 1 + r.brightness);
  if (r.contrast > 0) p.contrast = rng.uniform(kDrawContrast, 1 - r.contrast, 1 + r.contrast);
  return p;
}

void apply_augment(cv::Mat& img, const AugmentParams& p, int out_size) {
  const int type = img.type();
  LANCET_CHECK(!img.empty() && (type == CV_8UC1 || type == CV_8UC3 || type == CV_16UC1),
               "augment: image must be 8-bit gray, 8-bit RGB or 16-bit gray and non-empty, got "
                   << img.cols << "x" << img.rows << " with " << img.channels() << " channel(s) of depth "
                   << img.depth());
  LANCET_CHECK(out_size >= 1, "augment: out_size must be at least 1, got " << out_size);
  LANCET_CHECK(p.crop_x >= 0 && p.crop_y >= 0 && p.crop_w >= 1 && p.crop_h >= 1 && p.crop_x + p.crop_w <= img.cols &&
                   p.crop_y + p.crop_h <= img.rows,
               "augment: crop " << p.crop_w << "x" << p.crop_h << "+" << p.crop_x << "+" << p.crop_y
                                << " is outside the " << img.cols << "x" << img.rows << " image");
  const bool whole = p.crop_w == img.cols && p.crop_h == img.rows;
  cv::Mat m = whole ? img : img(cv::Rect(p.crop_x, p.crop_y, p.crop_w, p.crop_h));
  if (m.cols != out_size || m.rows != out_size) {
    // Area averaging when shrinking both ways (an anti-aliased resize), bilinear otherwise.
    const int interp = m.cols > out_size && m.rows > out_size ? cv::INTER_AREA : cv::INTER_LINEAR;
    cv::Mat r;
    cv::resize(m, r, cv::Size(out_size, out_size), 0, 0, interp);
    m = r;
  } else if (!whole) {
    m = m.clone();
  }
  if (p.hflip || p.vflip) cv::flip(m, m, p.hflip && p.vflip ? -1 : (p.hflip ? 1 : 0));
  if (p.angle_deg != 0) {
    const cv::Point2f centre(0.5f * static_cast<float>(m.cols - 1), 0.5f * static_cast<float>(m.rows - 1));
    const cv::Mat rot = cv::getRotationMatrix2D(centre, p.angle_deg, 1.0);
    cv::Mat r;
    cv::warpAffine(m, r, rot, m.size(), cv::INTER_LINEAR, cv::BORDER_REPLICATE);
    m = r;
  }
  // convertTo rounds and saturates to the image's own depth (8 or 16 bits).
  if (p.brightness != 1) m.convertTo(m, m.type(), p.brightness, 0);
  if (p.contrast != 1) {
    // torchvision adjust_contrast: blend with the mean of the grayscale image.
    const cv::Scalar mean = cv::mean(m);
    const double gray = m.channels() == 3 ? 0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2] : mean[0];
    m.convertTo(m, m.type(), p.contrast, (1 - p.contrast) * gray);
  }
  img = m;
}

void augment(cv::Mat& img, const AugmentConfig& cfg, uint64_t seed, int epoch, int64_t index, bool minority,
             int out_size) {
  LANCET_CHECK(!img.empty(), "augment: image must be non-empty");
  apply_augment(img, draw_augment_params(cfg, seed, epoch, index, minority, img.rows, img.cols), out_size);
}

template <typename T>
void apply_augment(PixelImage<T>& img, const AugmentParams& p, int out_size) {
  static_assert(std::is_same_v<T, uint8_t> || std::is_same_v<T, uint16_t>, "PixelImage<uint8_t> or <uint16_t>");
  LANCET_CHECK(img.height >= 1 && img.width >= 1 && (img.channels == 1 || img.channels == 3) &&
                   img.data.size() == static_cast<size_t>(img.height) * img.width * img.channels,
               "augment: image must be non-empty with 1 or 3 channels and height * width * channels values, got "
                   << img.width << "x" << img.height << "x" << img.channels << " with " << img.data.size() << " values");
  const int depth = std::is_same_v<T, uint8_t> ? CV_8U : CV_16U;
  cv::Mat m(img.height, img.width, CV_MAKETYPE(depth, img.channels), img.data.data());
  apply_augment(m, p, out_size);
  if (m.data != reinterpret_cast<uchar*>(img.data.data())) {  // else modified in place already
    const T* src = m.ptr<T>();  // continuous: apply_augment's new buffers always are
    img.data.assign(src, src + m.total() * static_cast<size_t>(m.channels()));
  }
  img.height = m.rows;
  img.width = m.cols;
}

template <typename T>
void augment(PixelImage<T>& img, const AugmentConfig& cfg, uint64_t seed, int epoch, int64_t index, bool minority,
             int out_size) {
  apply_augment(img, draw_augment_params(cfg, seed, epoch, index, minority, img.height, img.width), out_size);
}

template void apply_augment(PixelImage<uint8_t>&, const AugmentParams&, int);
template void apply_augment(PixelImage<uint16_t>&, const AugmentParams&, int);
template void augment(PixelImage<uint8_t>&, const AugmentConfig&, uint64_t, int, int64_t, bool, int);
template void augment(PixelImage<uint16_t>&, const AugmentConfig&, uint64_t, int, int64_t, bool, int);

// ---- samplers ----------------------------------------------------------------------------------

std::vector<int64_t> class_balanced_order(const std::vector<int64_t>& labels, int num_classes, uint64_t seed,
                                          int epoch, int64_t length) {
  class_counts(labels, num_classes, "class_balanced_order");
  LANCET_CHECK(length >= 0, "class_balanced_order: length must be >= 0, got " << length);
  auto members = members_by_class(labels, num_classes);
  members.erase(std::remove_if(members.begin(), members.end(), [](const auto& m) { return m.empty(); }), members.end());
  const CounterRng rng(seed, kBalancedStream, epoch, 0);
  std::vector<int64_t> order(static_cast<size_t>(length));
  for (size_t k = 0; k < order.size(); ++k) {
    const auto& m = members[rng.below(2 * k, members.size())];
    order[k] = m[rng.below(2 * k + 1, m.size())];
  }
  return order;
}

std::vector<int64_t> oversample_minority(const std::vector<int64_t>& labels, int num_classes, uint64_t seed,
                                         int epoch) {
  const auto counts = class_counts(labels, num_classes, "oversample_minority");
  const auto members = members_by_class(labels, num_classes);
  const size_t most = static_cast<size_t>(*std::max_element(counts.begin(), counts.end()));
  std::vector<int64_t> order;
  order.reserve(most * members.size());
  for (size_t c = 0; c < members.size(); ++c) {
    const auto& m = members[c];
    if (m.empty()) continue;
    for (size_t r = 0; r < most / m.size(); ++r) order.insert(order.end(), m.begin(), m.end());
    // The remainder: the first most % size of a shuffled copy (index c + 1: the final shuffle is 0).
    std::vector<int64_t> extra = m;
    shuffle(extra, CounterRng(seed, kOversampleStream, epoch, static_cast<int64_t>(c) + 1));
    order.insert(order.end(), extra.begin(), extra.begin() + static_cast<std::ptrdiff_t>(most % m.size()));
  }
  shuffle(order, CounterRng(seed, kOversampleStream, epoch, 0));
  return order;
}

std::vector<bool> minority_classes(const std::vector<int64_t>& labels, int num_classes, double threshold) {
  LANCET_CHECK(threshold >= 0 && threshold <= 1, "minority_classes: threshold must be in [0, 1], got " << threshold);
  const auto counts = class_counts(labels, num_classes, "minority_classes");
  const double most = static_cast<double>(*std::max_element(counts.begin(), counts.end()));
  std::vector<bool> flags(counts.size());
  for (size_t c = 0; c < counts.size(); ++c) flags[c] = static_cast<double>(counts[c]) < threshold * most;
  return flags;
}

}  // namespace lancet
