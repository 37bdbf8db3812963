// image_dataset.h — training and validation samples kept as 8-bit (or, at data.bit_depth 16,
// 16-bit) images, normalised on read.
//
// What a MONAI user knows as CacheDataset: the deterministic part of the pipeline — decode
// (DICOM windowing included), data.preprocess, conversion to data.channels and the resize to
// data.image_size — runs once at load (in parallel); the result is kept in memory as uint8
// S x S x C images (HWC, RGB order), 4x smaller than float32 tensors. The random part,
// augmentation (data/augment.h), and the (pixel / 255 - mean) / std normalisation run per
// sample when a batch is built (data/loader.h), so every epoch sees freshly augmented images.
//
// get() (no augmentation) gives bit for bit the floats that load_dataset's InMemoryDataset
// holds for the same source and options: resize_image + preprocess_image is preprocess_image.
//
// Bad input (data.on_bad_sample): `error` (default) refuses the split with the first bad
// file's one-line error, as load_dataset does; `skip` drops every sample that cannot be
// decoded or preprocessed and lists them in skipped() ("<file>: <reason>", in source order).
// A damaged pack (hash) or a bad manifest is refused either way: that is not one sample.
//
// Streaming (data.cache false; MONAI's plain Dataset), for datasets larger than memory:
// nothing is decoded at load; every read decodes sample i anew (an image file with the recipe,
// or one chunk of a pack) and resizes it, in the loader's worker threads — the same bytes the
// cache would hold, so training is identical either way. A bad file then fails the read that
// meets it ("<file>: <reason>"); data.on_bad_sample skip needs the cache (it finds bad files
// up front).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "data/augment.h"
#include "data/dataset.h"
#include "data/image_folder.h"

namespace lancet {

enum class BadSample { error, skip };
// "error" or "skip"; anything else throws naming data.on_bad_sample.
BadSample parse_bad_sample(const std::string& s);

class CachedImageDataset final : public Dataset {
 public:
  // pixels: labels.size() images of opt.image_size^2 x opt.channels samples (HWC), back to back,
  // as bytes: uint8, or native-endian uint16 at opt.bit_depth 16;
  // names[i] says where sample i came from (for errors). Throws on inconsistent sizes or labels.
  CachedImageDataset(std::vector<uint8_t> pixels, std::vector<int64_t> labels, std::vector<std::string> class_names,
                     std::vector<std::string> names, const ImageLoadOptions& opt,
                     std::vector<std::string> skipped = {});
  // Streaming: source(i) decodes sample i at opt.bit_depth (thread-safe; throws "<name>:
  // <reason>"); it is converted to opt.channels and resized to opt.image_size on every read.
  using SampleSource = std::function<DecodedImage(int64_t)>;
  CachedImageDataset(SampleSource source, std::vector<int64_t> labels, std::vector<std::string> class_names,
                     std::vector<std::string> names, const ImageLoadOptions& opt);
  bool streaming() const { return static_cast<bool>(source_); }

  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  Shape sample_shape() const override { return {opt_.channels, opt_.image_size, opt_.image_size}; }
  const std::vector<std::string>& class_names() const override { return class_names_; }
  int64_t label(int64_t i) const override { return labels_[static_cast<size_t>(i)]; }
  // Normalised, not augmented. Never throws when cached; a streamed read that cannot decode
  // its sample throws "<file>: <reason>".
  void get(int64_t i, float* out) const override;
  // Sample i put through augment(cfg, seed, epoch, index i, minority) and then normalised.
  // Throws "<name(i)>: <reason>" (the augmentation's own errors).
  void get_augmented(int64_t i, const AugmentConfig& cfg, uint64_t seed, int epoch, bool minority, float* out) const;

  // Image i before normalisation: S x S x C samples, HWC, as bytes (bits() / 8 a sample).
  // Cached datasets only.
  const uint8_t* pixels(int64_t i) const;
  // Image i before normalisation, cached or streamed (decoded now), as pixels() gives it.
  std::vector<uint8_t> image(int64_t i) const;
  int bits() const { return opt_.bit_depth; }
  const std::vector<int64_t>& labels() const { return labels_; }
  const std::string& name(int64_t i) const { return names_[static_cast<size_t>(i)]; }
  // The file sample i was made from: for a pack, the source file lancet prep recorded
  // (relative to the folder it packed; packs without the record: name(i)); else name(i).
  const std::string& origin(int64_t i) const {
    return origins_.empty() ? name(i) : origins_[static_cast<size_t>(i)];
  }
  // Sets origin(i) for every sample (one each; throws otherwise).
  void set_origins(std::vector<std::string> origins);
  const std::vector<std::string>& skipped() const { return skipped_; }
  const ImageLoadOptions& options() const { return opt_; }

 private:
  std::vector<uint8_t> pixels_;
  std::vector<int64_t> labels_;
  std::vector<std::string> class_names_, names_, skipped_, origins_;
  ImageLoadOptions opt_;
  size_t per_;  // bytes an image
  SampleSource source_;  // streaming; empty when cached
};

// Any source load_dataset takes (folder or manifest, MedMNIST .npz, pack .h5), cached as
// above, or with `stream` read sample by sample (a pack's content hash is still verified, in
// one pass that keeps nothing). Errors as load_dataset's; `note` as load_dataset's (pack
// verification).
std::unique_ptr<CachedImageDataset> load_cached_dataset(const std::string& source, const std::string& split,
                                                        const ImageLoadOptions& opt, BadSample on_bad = BadSample::error,
                                                        std::string* note = nullptr, bool stream = false);

}  // namespace lancet
