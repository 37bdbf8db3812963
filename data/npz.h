// npz.h — NumPy .npy arrays and .npz archives, and MedMNIST-style .npz datasets.
//
// An .npz is a zip archive of .npy members (numpy.savez / savez_compressed). The reader parses
// the zip central directory itself (ZIP64 included: numpy writes ZIP64 local headers), takes
// stored and deflated members (inflated with zlib), checks each member's CRC-32, and parses
// the .npy header (format versions 1-3): little-endian or byte-order-free dtypes bool, int8-64,
// uint8-64, float32/64 in C order. Refused with one line naming the file and member: big-endian
// arrays, Fortran order, object and structured dtypes, other compression methods, encrypted
// members, truncated or corrupt archives.
//
// MedMNIST layout (load_npz_dataset): members <split>_images and <split>_labels for split in
// train, val, test; images uint8 [N, H, W] (gray) or [N, H, W, 3] (RGB; [N, H, W, 1] is gray
// too); labels [N] or [N, 1] of any integer type, values >= 0. Class names are "0".."k-1", k =
// 1 + the largest label of every <split>_labels member, so all splits agree on them, and every
// index below k must have a sample in some split (labels {0, 5} are refused naming the missing
// indices, as for a manifest's integer labels); with data.classes (ImageLoadOptions::classes)
// they are its names, a label >= its size is refused naming the file, and gaps are allowed.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/image_folder.h"

namespace lancet {

// One .npy array: raw little-endian bytes in C order.
struct NpyArray {
  std::string descr;           // numpy dtype descr as written, e.g. "|u1", "<i8"
  char kind = 'u';             // 'b' bool, 'i' signed, 'u' unsigned, 'f' float
  int item_size = 1;           // bytes per element
  std::vector<int64_t> shape;  // () for a scalar
  std::vector<uint8_t> data;   // numel() * item_size bytes

  int64_t numel() const;
  std::string shape_str() const;  // "(2428, 28, 28)"
};

// Parses a whole .npy file image; `where` names it in errors ("file.npz:train_images.npy").
NpyArray parse_npy(const uint8_t* bytes, size_t size, const std::string& where);

// An integer (or bool) array's values as int64. Throws for float arrays and uint64 values
// beyond int64.
std::vector<int64_t> npy_to_int64(const NpyArray& a, const std::string& where);

class NpzFile {
 public:
  // Reads the central directory. Errors: cannot read, not a zip archive, truncated.
  static NpzFile open(const std::string& path);

  const std::string& path() const { return path_; }
  // Member names without the ".npy" suffix, in archive order.
  std::vector<std::string> keys() const;
  bool has(const std::string& key) const { return members_.count(key) != 0; }
  // Reads, inflates, checks the CRC and parses one member. Throws for a missing key (listing
  // the present ones) and every refusal above.
  NpyArray read(const std::string& key) const;

  struct Member {
    std::string name;  // as in the archive, e.g. "train_images.npy"
    uint16_t method = 0, flags = 0;
    uint32_t crc = 0;
    uint64_t compressed = 0, uncompressed = 0, local_offset = 0;
    size_t order = 0;
  };

 private:
  std::string path_;
  uint64_t file_size_ = 0;
  std::map<std::string, Member> members_;
};

// The MedMNIST layout above: split "train", "val" or "test" (any name with <split>_images and
// <split>_labels members). Every image goes through preprocess_image (image_folder.h), so a
// sample equals the same pixels loaded from an image file.
std::unique_ptr<InMemoryDataset> load_npz_dataset(const std::string& path, const std::string& split,
                                                  const ImageLoadOptions& opt);

// The pieces of load_npz_dataset, for `lancet prep`: the images member of `split`, checked
// (uint8, (N, H, W) or (N, H, W, 1|3)); the labels of `split` and, in `classes`, the class
// names over every split (above: `declared`, or "0".."k-1" where a gap is refused); image i
// with opt.recipe applied (a gray or RGB 8-bit image, widened to 16 bits at opt.bit_depth 16;
// throws like the recipe).
NpyArray read_npz_images(const NpzFile& npz, const std::string& split);
std::vector<int64_t> read_npz_labels(const NpzFile& npz, const std::string& split,
                                     const std::vector<std::string>& declared, std::vector<std::string>* classes);
DecodedImage npz_image(const NpyArray& images, int64_t i, const ImageLoadOptions& opt);

// The splits of a MedMNIST .npz (names with both members), in train, val, test order first.
std::vector<std::string> npz_splits(const NpzFile& npz);

}  // namespace lancet
