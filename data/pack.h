// pack.h — packed HDF5 datasets, written by `lancet prep` and read by the trainer.
//
// A pack holds every split of a source (an image folder or manifest, DICOMs included, or a
// MedMNIST .npz) decoded, put through the preprocessing recipe and resized once, so training
// reads pixels instead of decoding files. Layout (plain HDF5, readable with h5py):
//   /                 attributes (strings): format "lancet-pack", version "2", classes (JSON
//                     list of names), image_size, channels, dtype "uint8" or "uint16" (the
//                     data.bit_depth it was made at: 8 or 16), recipe (the
//                     canonical recipe JSON), recipe_fingerprint (PreprocessRecipe::fingerprint),
//                     dicom_window (JSON: [centre, width] as configured, [] for each file's
//                     own), dicom_files (how many packed images were DICOMs, decoded with that
//                     window), source, hash_algorithm "fnv1a64"
//   /<split>/images   uint8 or uint16 [N, S, S] (1 channel) or uint8 [N, S, S, 3] (RGB; 16-bit
//                     packs are grayscale, as data.bit_depth 16 is), chunked one image per
//                     chunk ([1, S, S(, 3)]) so that one sample is one chunk read; optionally
//                     gzip-compressed
//   /<split>/labels   int64 [N]
//   /<split>/sources  uint8 [bytes]: a JSON list of the N source files the images were made from
//                     (relative to the packed folder; an .npz's "<path>:<split>_images[i]"), for
//                     reports (lancet eval --predictions); not part of the hash; optional (packs
//                     made before it was written have none)
//   /<split>          attributes: hash, 16 hex digits, FNV-1a 64-bit over the images' bytes in
//                     C order (uint16 samples little-endian), then the labels as int64
//                     little-endian; skipped, the number of
//                     source images left out (--on-bad-sample skip), and skipped_files, a JSON
//                     list of their "<file>: <reason>" lines
// Version 1 packs (before dicom_window was recorded) are refused: run lancet prep again.
// The stored pixels are resize_image() of the decoded, recipe-applied images (image_folder.h),
// so loading a pack at its own image_size and channels gives bit for bit the tensors that
// loading the source directly gives. A pack is read at the data.bit_depth it was made at: a
// uint8 pack cannot give what 16 bits would have kept, and narrowing a uint16 pack would not
// give what an 8-bit read of the source gives (the resize rounds at another depth), so a
// different data.bit_depth is refused (prep again).
#pragma once
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/image_dataset.h"
#include "data/image_folder.h"

namespace lancet {

struct PackOptions {
  // channels, image_size (the pack's S), bit_depth (the pack's dtype), recipe, dicom_window and
  // classes are used; mean/std are not.
  ImageLoadOptions load;
  // Splits to pack; empty: whichever of train, val, test the source has (at least one).
  std::vector<std::string> splits;
  int gzip = 0;                  // 0 (none) to 9
  int64_t block = 256;           // images decoded in parallel between writes (bounds memory)
  // error: the first unreadable or corrupt source image stops the prep, naming it; skip: such
  // images are left out, and listed in the summary, the log and the split's attributes.
  BadSample on_bad = BadSample::error;
  std::ostream* log = nullptr;   // progress and the summary, when set
  // A progress line (images done, images/s) on `log` every this many images of a split (at
  // the next block boundary; 0: none). With progress_tty the lines overwrite each other
  // ('\r', for a terminal); otherwise each is a plain line of its own (for log files).
  int64_t progress_every = 2048;
  bool progress_tty = false;
};

struct PackSplitSummary {
  std::string name;
  int64_t count = 0;                  // images packed
  std::vector<int64_t> per_class;
  std::string hash;
  std::vector<std::string> skipped;   // "<file>: <reason>" of the images left out (on_bad skip)
};

// Writes the pack atomically (temporary file beside `out`, fsync, rename): on any error —
// an unreadable or corrupt source image ("<file>: <reason>") unless opt.on_bad is skip, a
// missing split, splits with different classes, a split with no readable image — nothing is
// left at `out` or beside it. First removes the temporary files of earlier writers of `out`
// that were killed (remove_stale_temp_files_of, data/h5file.h; logged). Returns what was
// written.
std::vector<PackSplitSummary> write_pack(const std::string& source, const std::string& out, const PackOptions& opt);

// True when `path` names a pack: an existing file ending in .h5 or .hdf5.
bool is_pack_path(const std::string& path);

struct PackInfo {
  std::vector<std::string> classes;
  std::vector<std::string> splits;
  int image_size = 0, channels = 0;
  int bit_depth = 8;               // 8 (dtype uint8) or 16 (uint16)
  std::string recipe;              // canonical JSON
  std::string recipe_fingerprint;
  std::vector<double> dicom_window;  // the data.dicom.window its DICOMs were decoded with; empty: the files' own
  int dicom_files = 0;               // packed images that were DICOM files
  std::string source;
};
// Reads and checks the pack's attributes. Errors: not a pack, unknown version, a recipe whose
// fingerprint no longer matches (a stale pack, made by a lancet whose ops differ).
PackInfo read_pack_info(const std::string& path);

// Reads one split into memory, checks its content hash (a damaged or tampered pack is
// refused), that it was made with opt.recipe and opt.bit_depth, with opt.classes when given
// (the same names in the same order) and, when it holds DICOM images, with opt.dicom_window
// (else: re-run lancet prep), then puts every image through preprocess_image (convert, resize
// when opt differs from the pack, normalise; the recipe is not applied again). `note`, when
// set, receives one line for the log.
std::unique_ptr<InMemoryDataset> load_pack_dataset(const std::string& path, const std::string& split,
                                                   const ImageLoadOptions& opt, std::string* note = nullptr);

// The checked pixels of one split as stored (the part of load_pack_dataset before
// preprocess_image): n images of size x size x channels samples, HWC, C order, as bytes
// (uint8, or native-endian uint16 when bits is 16). Same checks and errors as
// load_pack_dataset.
struct PackSplit {
  std::vector<uint8_t> pixels;
  int64_t n = 0;
  int size = 0, channels = 0;
  int bits = 8;
  std::vector<int64_t> labels;
  std::vector<std::string> sources;  // /<split>/sources, when the pack has it (else empty)
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
  DecodedImage image(const std::string& split, int64_t i) const;  // at info().bit_depth

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  PackInfo info_;
};

// FNV-1a 64-bit, streamed: h = fnv1a64(bytes, n, h), starting from kFnvOffset.
constexpr uint64_t kFnvOffset = 14695981039346656037ull;
uint64_t fnv1a64(const uint8_t* bytes, size_t n, uint64_t h = kFnvOffset);

}  // namespace lancet
