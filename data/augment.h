// augment.h — training-time data augmentation and class-aware samplers.
//
// Every random choice is a pure function of (seed, epoch, sample index, draw number): a
// counter-based hash, no shared generator. So an augmented sample is the same whatever the
// worker count, the order in which workers reach it, or whether the run was resumed.
//
// How the loader calls it (DataLoader's workers, through CachedImageDataset::get_augmented,
// data/loader.h and data/image_dataset.h): per training sample, after preprocessing —
// decode, convert to the configured channels, resize to image_size x image_size — and before
// the (pixel / max - mean) / std normalisation (max 255, or 65535 at data.bit_depth 16):
//
//   const bool minority = minority_flags[label];            // minority_classes(train labels)
//   augment(img, cfg, train.seed, epoch, sample_index, minority, image_size);
//   ... then normalise img into the CHW float sample
//
// Validation and test samples are never augmented. `sample_index` is the dataset index (not
// the position in the epoch order), so a sample drawn twice in one epoch by an oversampling
// sampler gets the same augmentation; use the position instead when that is not wanted.
//
// Images are 8-bit gray, 8-bit RGB (channel order R, G, B) or 16-bit gray. The operations,
// in this order: random resized crop (torchvision RandomResizedCrop) to out_size x out_size
// (off: a plain resize when the size differs), horizontal flip, vertical flip, rotation about
// the centre (border replicated), brightness, contrast (torchvision ColorJitter, fixed order).
#pragma once
#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

namespace cv {
class Mat;
}  // namespace cv

namespace lancet {

// The `data.augment` settings. Defaults: everything off.
struct AugmentConfig {
  double hflip = 0;       // probability of a horizontal flip, [0, 1]
  double vflip = 0;       // probability of a vertical flip, [0, 1]
  double rotate_deg = 0;  // angle uniform in [-r, r] degrees, r in [0, 180]
  bool crop = false;      // random_resized_crop on/off (JSON null = off)
  std::array<double, 2> crop_scale{0.08, 1.0};           // area fraction, 0 < lo <= hi <= 1
  std::array<double, 2> crop_ratio{3.0 / 4.0, 4.0 / 3.0};  // width / height, 0 < lo <= hi
  double brightness = 0;  // factor uniform in [1 - b, 1 + b], b in [0, 1]
  double contrast = 0;    // factor uniform in [1 - c, 1 + c], c in [0, 1]
  // For minority-class samples, the rotation, crop and jitter ranges are multiplied by this
  // (in [0, 4]); the results are clamped: rotation to 180 degrees, jitter to 1, crop scale
  // to [0.05, 1] and aspect ratio to [1/4, 4]. Flip probabilities are not changed.
  double minority_strength = 1;

  // Parses {"hflip": 0.5, "rotate_deg": 10, "random_resized_crop": {"scale": [0.8, 1],
  // "ratio": [0.75, 1.3333]}, ...}; missing keys keep the defaults, null = all defaults.
  // Unknown keys and bad values throw one line naming data.augment.<key>.
  static AugmentConfig from_json(const nlohmann::json& j);
  nlohmann::json to_json() const;  // every key; from_json(to_json()) gives the same config
  bool enabled() const;            // whether any operation can change an image
};

// What one sample's draws came to. augment() = apply_augment(draw_augment_params(...)).
struct AugmentParams {
  int crop_x = 0, crop_y = 0, crop_w = 0, crop_h = 0;  // region of the input; whole image when off
  bool hflip = false, vflip = false;
  double angle_deg = 0;   // counter-clockwise as displayed (OpenCV's convention)
  double brightness = 1;  // multiplicative factors; 1 = unchanged
  double contrast = 1;
};

// The random choices for sample `index` of `epoch`, for an input of height x width. Pure:
// depends only on its arguments. Throws on height or width < 1, epoch < 0 or index < 0.
AugmentParams draw_augment_params(const AugmentConfig& cfg, uint64_t seed, int epoch, int64_t index,
                                  bool minority, int height, int width);

// Applies p; afterwards img is out_size x out_size with its old type. img must be CV_8UC1,
// CV_8UC3 or CV_16UC1, non-empty, and p's crop inside it. Steps that can run in place write
// into img's pixels, so clone an img that shares them with anything that must not change.
void apply_augment(cv::Mat& img, const AugmentParams& p, int out_size);

// Draws and applies in place (see the file comment for the order of operations).
void augment(cv::Mat& img, const AugmentConfig& cfg, uint64_t seed, int epoch, int64_t index, bool minority,
             int out_size);

// The same for callers without OpenCV: row-major, channel-interleaved pixels, no padding.
// T is uint8_t (channels 1 or 3) or uint16_t (channels 1).
template <typename T>
struct PixelImage {
  int height = 0;
  int width = 0;
  int channels = 1;
  std::vector<T> data;  // height * width * channels values
};
template <typename T>
void apply_augment(PixelImage<T>& img, const AugmentParams& p, int out_size);
template <typename T>
void augment(PixelImage<T>& img, const AugmentConfig& cfg, uint64_t seed, int epoch, int64_t index, bool minority,
             int out_size);

// ---- samplers: index orders for one epoch, pure functions of their arguments ----------------
// labels[i] is sample i's class in [0, num_classes). Plain shuffling is epoch_permutation
// (not repeated here).

// `length` indices drawn with replacement so that every class present is equally likely and,
// within a class, every sample (torch WeightedRandomSampler with weight 1 / count(label)).
// Classes with no samples are never drawn. Throws on no samples, a bad label or length < 0.
std::vector<int64_t> class_balanced_order(const std::vector<int64_t>& labels, int num_classes, uint64_t seed,
                                          int epoch, int64_t length);

// Every class present topped up to the largest class's count by repeating its indices (each
// one floor(max / count) or that + 1 times; which ones get the extra copy is drawn), then all
// shuffled. Length = max count * number of classes present.
std::vector<int64_t> oversample_minority(const std::vector<int64_t>& labels, int num_classes, uint64_t seed,
                                         int epoch);

// flags[c] = count(c) < threshold * (largest class count); threshold in [0, 1].
std::vector<bool> minority_classes(const std::vector<int64_t>& labels, int num_classes, double threshold = 0.5);

}  // namespace lancet
