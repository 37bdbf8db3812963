// preprocess.h — image preprocessing ops composed in the config (data.preprocess) and applied
// identically in training and inference.
//
// A recipe is a JSON list of ops, each an object with "op" and its parameters (absent ones
// take the defaults below):
//   {"op":"resize", "size":224, "keep_aspect":false, "pad_value":0}
//       size is required. Output size x size; INTER_AREA when no side grows, INTER_LINEAR
//       otherwise. keep_aspect scales the longer side to `size` (the shorter one rounded,
//       at least 1) and pads to a centred square with the constant pad_value (every channel;
//       the extra row/column goes to the bottom/right). pad_value is an 8-bit level, 0..255,
//       at every depth: 16-bit images are padded with pad_value * 257, the same grey, so one
//       recipe pads 8-bit files, 16-bit files and DICOMs (windowed to 8 or 16 bits by
//       data.bit_depth) alike.
//   {"op":"clahe", "clip_limit":2.0, "tile_grid":8}
//       cv::createCLAHE(clip_limit, tile_grid x tile_grid) on 8-bit gray images, and on the L
//       channel of Lab for RGB images (8-bit only). 16-bit gray images (a 16-bit PNG; a DICOM
//       at data.bit_depth 16) get the same operator with the same meaning: tiles, clipping and
//       redistribution over the 256 8-bit levels exactly as cv::CLAHE does at 8 bits, the
//       tile curves kept unrounded and read between levels, so detail within a level
//       survives; on widened 8-bit content it gives the 8-bit result to within one level.
//       (cv::CLAHE itself, at 16 bits, histograms 65536 levels and divides clip_limit by that
//       count: most images come out nearly unchanged.)
//   {"op":"gamma", "gamma":1.0}
//       out = round(max * (in / max)^gamma), max = 255 or 65535, as a lookup table.
//   {"op":"median_blur", "ksize":3}          cv::medianBlur; odd ksize >= 3 (3 or 5 on 16-bit).
//   {"op":"gaussian_blur", "ksize":5, "sigma":0.0}
//       cv::GaussianBlur with ksize x ksize, sigma in x and y (0: derived from ksize).
//   {"op":"contrast_normalize", "percentiles":[0, 100]}
//       Affine stretch of [lo, hi] to the full range [0, max], clipped: lo and hi are the
//       pixel values at ranks round(p / 100 * (N - 1)) of all N channel values of the image
//       (one map for every channel, so colours keep their balance). [0, 100] is the min-max
//       stretch, bit-identical to cv::normalize(img, out, 0, max, NORM_MINMAX). An image
//       with hi == lo (constant) is left unchanged.
//   {"op":"to_gray"}  RGB -> gray (cv::COLOR_RGB2GRAY); gray images unchanged.
//   {"op":"to_rgb"}   gray -> RGB (replicated); RGB images unchanged.
//
// Images are 8- or 16-bit gray or RGB (CV_8UC1 / CV_8UC3 / CV_16UC1 / CV_16UC3, channels in
// RGB order, not OpenCV's BGR); every op keeps the depth.
//
// How the loader calls it: build the recipe once from the resolved config
// (PreprocessRecipe::from_json(config["data"]["preprocess"])), share it read-only with every
// worker, and on each decoded image (RGB order, still at its stored bit depth so that 16-bit
// ops see the full range) call recipe.apply(img) before the existing steps of
// preprocess_image (conversion to ImageLoadOptions::channels, resize to image_size,
// mean/std normalisation, which stay there). `lancet eval` takes the recipe, like every other
// pixel setting, from the training configuration saved in the weights file (/train config,
// trainer/weights.h) unless the command line gives it (a different one is logged); a file
// without one (a PyTorch export) gets the given recipe or none. `lancet forward` reads batches
// already preprocessed. A cache of preprocessed images stores fingerprint() and is stale when
// it differs.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

// Forward declaration, so that config and trainer code can hold a recipe without OpenCV's
// include path (OpenCV declares it the same way in opencv2/core/base.hpp).
namespace cv {
class Mat;
}  // namespace cv

namespace lancet {

using Json = nlohmann::json;

// One op with every parameter resolved (defaults filled in); fields not used by `kind`
// keep their defaults.
struct PreprocessOp {
  enum class Kind { resize, clahe, gamma, median_blur, gaussian_blur, contrast_normalize, to_gray, to_rgb };
  Kind kind = Kind::to_gray;
  int size = 0;                  // resize
  bool keep_aspect = false;      // resize
  int pad_value = 0;             // resize with keep_aspect; an 8-bit level 0..255 (* 257 on 16 bits)
  double clip_limit = 2.0;       // clahe; > 0
  int tile_grid = 8;             // clahe; tiles per side
  double gamma = 1.0;            // gamma; > 0
  int ksize = 3;                 // median_blur (default 3), gaussian_blur (default 5); odd
  double sigma = 0.0;            // gaussian_blur; >= 0
  double low_percentile = 0.0;   // contrast_normalize; 0 <= low < high <= 100
  double high_percentile = 100.0;
};

const char* preprocess_op_name(PreprocessOp::Kind kind);

// An ordered list of ops. Immutable after construction: apply() is const, keeps no state
// between calls and creates its OpenCV objects (CLAHE) per call, so one recipe may be
// applied from many threads at once. The default recipe is empty (apply is a no-op).
class PreprocessRecipe {
 public:
  PreprocessRecipe() = default;

  // Parses a JSON list of ops. Throws lancet::Error (one line) naming `where[i].key` for a
  // list that is not an array, an op that is not an object, a missing or unknown "op", an
  // unknown key (the valid ones are listed), a wrongly typed or out-of-range value, or a
  // missing required parameter (resize.size).
  static PreprocessRecipe from_json(const Json& ops, const std::string& where = "data.preprocess");

  // The canonical list: every parameter written out, so from_json(to_json()) is an equal
  // recipe and the output does not depend on how the input spelled its defaults.
  Json to_json() const;

  // A short stable string identifying what apply() does ("pp<version>-" + 16 hex digits, a
  // hash of to_json() and a version number that changes whenever the output of one of its
  // ops changes): equal for equal recipes regardless of key order or spelled-out defaults.
  std::string fingerprint() const;

  // Replaces `image` with the result of the ops in order. Never writes into the input's
  // pixel buffer (each op produces a new cv::Mat; an op with nothing to do keeps the
  // input), so `image` may wrap memory the caller does not own. Throws lancet::Error (one
  // line, naming where[i] and the op) for an unsupported image type (see above), CLAHE on
  // 16-bit RGB, or median_blur ksize > 5 on 16 bits.
  void apply(cv::Mat& image) const;

  const std::vector<PreprocessOp>& ops() const { return ops_; }
  bool empty() const { return ops_.empty(); }
  const std::string& where() const { return where_; }

 private:
  std::vector<PreprocessOp> ops_;
  // gamma lookup tables per op (empty for other ops), built once by from_json.
  std::vector<std::vector<uint8_t>> lut8_;
  std::vector<std::vector<uint16_t>> lut16_;
  std::string where_ = "data.preprocess";
};

}  // namespace lancet
