// pack.h — packed HDF5 datasets, written by `lancet prep` and read by the trainer.
//
// A pack holds every split of a source (an image folder or manifest, DICOMs included, or a
// MedMNIST .npz) decoded, put through the preprocessing recipe and resized once, so training
// reads pixels instead of decoding files. Layout (plain HDF5, readable with h5py):
//   /                 attributes (strings): format "lancet-pack", version "1", classes (JSON
//                     list of names), image_size, channels, dtype "uint8", recipe (the
//                     canonical recipe JSON), recipe_fingerprint (PreprocessRecipe::fingerprint),
//                     source, hash_algorithm "fnv1a64"
//   /<split>/images   uint8 [N, S, S] (1 channel) or [N, S, S, 3] (RGB), chunked one image per
//                     chunk ([1, S, S(, 3)]) so that one sample is one chunk read; optionally
//                     gzip-compressed
//   /<split>/labels   int64 [N]
//   /<split>          attribute hash: 16 hex digits, FNV-1a 64-bit over the images' bytes in C
//                     order, then the labels as int64 little-endian
// The stored pixels are resize_image() of the decoded, recipe-applied images (image_folder.h),
// so loading a pack at its own image_size and channels gives bit for bit the tensors that
// loading the source directly gives.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/image_folder.h"

namespace lancet {

struct PackOptions {
  // channels, image_size (the pack's S), recipe and dicom_window are used; mean/std are not.
  ImageLoadOptions load;
  // Splits to pack; empty: whichever of train, val, test the source has (at least one).
  std::vector<std::string> splits;
  int gzip = 0;                  // 0 (none) to 9
  int64_t block = 256;           // images decoded in parallel between writes (bounds memory)
  std::ostream* log = nullptr;   // progress and the summary, when set
};

struct PackSplitSummary {
  std::string name;
  int64_t count = 0;
  std::vector<int64_t> per_class;
  std::string hash;
};

// Writes the pack atomically (temporary file beside `out`, fsync, rename): on any error —
// an unreadable or corrupt source image ("<file>: <reason>"), a missing split, splits with
// different classes — nothing is left at `out` or beside it. Returns what was written.
std::vector<PackSplitSummary> write_pack(const std::string& source, const std::string& out, const PackOptions& opt);

// True when `path` names a pack: an existing file ending in .h5 or .hdf5.
bool is_pack_path(const std::string& path);

struct PackInfo {
  std::vector<std::string> classes;
  std::vector<std::string> splits;
  int image_size = 0, channels = 0;
  std::string recipe;              // canonical JSON
  std::string recipe_fingerprint;
  std::string source;
};
// Reads and checks the pack's attributes. Errors: not a pack, unknown version, a recipe whose
// fingerprint no longer matches (a stale pack, made by a lancet whose ops differ).
PackInfo read_pack_info(const std::string& path);

// Reads one split into memory, checks its content hash (a damaged or tampered pack is
// refused) and that it was made with opt.recipe (else: re-run lancet prep), then puts every
// image through preprocess_image (convert, resize when opt differs from the pack, normalise;
// the recipe is not applied again). `note`, when set, receives one line for the log.
std::unique_ptr<InMemoryDataset> load_pack_dataset(const std::string& path, const std::string& split,
                                                   const ImageLoadOptions& opt, std::string* note = nullptr);

// The checked pixels of one split as stored (the part of load_pack_dataset before
// preprocess_image): n images of size x size x channels uint8, HWC, C order. Same checks and
// errors as load_pack_dataset.
struct PackSplit {
  std::vector<uint8_t> pixels;
  int64_t n = 0;
  int size = 0, channels = 0;
  std::vector<int64_t> labels;
  std::vector<std::string> classes;
};
PackSplit read_pack_split(const std::string& path, const std::string& split, const ImageLoadOptions& opt,
                          std::string* note = nullptr);
// The same checks (content hash included, read in blocks of 64 MB that are not kept) without
// keeping the pixels: `pixels` stays empty. For reading the split sample by sample afterwards.
PackSplit check_pack_split(const std::string& path, const std::string& split, const ImageLoadOptions& opt,
                           std::string* note = nullptr);

// Random access: image i of a split, one chunk read (no hash check).
class PackReader {
 public:
  explicit PackReader(const std::string& path);
  ~PackReader();
  const PackInfo& info() const { return info_; }
  int64_t size(const std::string& split) const;
  int64_t label(const std::string& split, int64_t i) const;
  Image8 image(const std::string& split, int64_t i) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  PackInfo info_;
};

// FNV-1a 64-bit, streamed: h = fnv1a64(bytes, n, h), starting from kFnvOffset.
constexpr uint64_t kFnvOffset = 14695981039346656037ull;
uint64_t fnv1a64(const uint8_t* bytes, size_t n, uint64_t h = kFnvOffset);

}  // namespace lancet
