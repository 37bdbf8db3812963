// image_folder.h — image classification datasets from a folder of image files.
//
// Two layouts (the first that applies wins):
//   1. <dir>/manifest.csv: a header row naming the columns path,label[,split] (any order,
//      extra columns ignored; a UTF-8 byte-order mark before it is skipped). path is relative
//      to <dir> (or absolute). label is a class name — the class list is the sorted unique
//      names over ALL rows of the manifest, so every split agrees on the indices — or, when
//      every label is a non-negative integer, the class index itself (class names
//      "0".."max"; every index in 0..max must have a row: a class without images would be a
//      model output that never trains, so a gap — labels {0, 5} — is refused naming the
//      missing indices). A split named that no row has is refused listing the split column's
//      values.
//   2. Class sub-folders: <dir>/<class>/*.{png,jpg,jpeg,bmp,tif,tiff,dcm,dicom}
//      (case-insensitive), or <dir>/<split>/<class>/... when split is non-empty. Classes are
//      the sorted folder names; files are taken in sorted name order.
// A declared class list (ImageLoadOptions::classes, data.classes) replaces the inferred one,
// in its order: every manifest label must then be one of its names or, when every label is
// an integer, an index below its size ("<manifest>:<line>: label 'x' is not one of the
// classes [a, b]"), and every class folder one of its names ("<dir>: class folder 'x' is not
// one of data.classes [a, b]"). A declared class may have no images (the user said it
// exists); an existing class folder without images is still refused.
// Every image is decoded, converted to `channels` (1 = grayscale, 3 = RGB; a gray image is
// replicated), resized to image_size x image_size with INTER_AREA, and normalised per
// channel: (pixel / max - mean[c]) / std[c], max 255 at bit_depth 8, 65535 at bit_depth 16.
// DICOM files (*.dcm, *.dicom; data/dicom.h) are decoded through DCMTK to bit_depth bits with
// the modality LUT, the window (dicom_window, else the file's, else min-max) and MONOCHROME1
// inversion, then take the same steps.
//
// bit_depth (data.bit_depth) is the depth an image keeps from decoding through the recipe, the
// resize, the cache and a pack, up to normalisation:
//   8  (default): 16-bit files go through the recipe at 16 bits, then are scaled to 8 bits
//      (v / 257, rounded); monochrome DICOMs are windowed to 0..255.
//   16 (grayscale only, channels 1): for 12- and 16-bit sources (DICOM, 16-bit PNG/TIFF)
//      whose grey levels 8 bits would merge. 16-bit files keep their 16 bits; monochrome
//      DICOMs are windowed to 0..65535 and go through the recipe at 16 bits; 8-bit files
//      (and colour DICOMs) go through the recipe at 8 bits, as at bit_depth 8, and are then
//      widened exactly (v * 257). The gray conversion and the resize run at 16 bits.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/preprocess.h"

namespace lancet {

struct ImageLoadOptions {
  int channels = 1;                // 1 (grayscale) or 3 (RGB)
  int image_size = 64;             // output H = W
  std::vector<float> mean{0.5f};   // per channel; a single value broadcasts
  std::vector<float> std{0.25f};   // per channel; a single value broadcasts; > 0
  std::vector<double> dicom_window;  // DICOM files: [centre, width]; empty: the file's window
  int bit_depth = 8;               // 8 or 16 (16: channels 1); see above
  // data.classes: the class names in label order; empty: inferred from the source (above).
  std::vector<std::string> classes;
  // Applied to every decoded image (RGB order, at its stored depth; DICOM: after windowing to
  // bit_depth bits, colour DICOMs to 8) before the steps above; null or empty: none. Shared
  // read-only by the workers.
  std::shared_ptr<const PreprocessRecipe> recipe;
};

// Loads the whole split into memory (decoding in parallel). split "" = all rows / the
// classless-split folder layout; otherwise only manifest rows whose split column equals it,
// or the <dir>/<split>/ folder. Errors (lancet::Error, one line): missing dir or split
// folder, bad manifest ("<manifest>:<line>: ..."), empty class folder, no matching rows,
// unreadable, corrupt or truncated image ("<file>: <reason>").
std::unique_ptr<InMemoryDataset> load_image_dataset(const std::string& dir, const std::string& split,
                                                    const ImageLoadOptions& opt);

// What a source path (data.dir) names: a folder (class sub-folders or manifest.csv), a MedMNIST
// .npz, or a pack .h5 / .hdf5 from lancet prep. Throws "<source>: <reason>" for anything else:
// a missing path, a manifest.csv named instead of its folder, another file. Defined in
// data/source.cpp.
enum class SourceKind { folder, npz, pack };
SourceKind source_kind(const std::string& source);

// Any source by what its path names: a folder (load_image_dataset), a MedMNIST .npz
// (data/npz.h, load_npz_dataset) or a pack .h5 written by lancet prep (data/pack.h,
// load_pack_dataset: `note` receives a line saying which recipe and hash were verified).
// Defined in data/source.cpp.
std::unique_ptr<InMemoryDataset> load_dataset(const std::string& source, const std::string& split,
                                              const ImageLoadOptions& opt, std::string* note = nullptr);

// The per-image step of load_image_dataset, shared with in-memory generators so that they
// produce bit-identical tensors: `pixels` is height x width x in_channels uint8, row-major,
// channel-interleaved (in_channels 1 = gray, 3 = RGB). Writes opt.channels x S x S floats
// (S = opt.image_size, CHW) to `out`: (pixel / 255 - mean) / std.
void preprocess_image(const uint8_t* pixels, int height, int width, int in_channels, const ImageLoadOptions& opt,
                      float* out);
// The same at either depth: `bytes` holds uint8 samples (bits 8) or native-endian uint16 ones
// (bits 16: gray conversion and resize at 16 bits, then (pixel / 65535 - mean) / std).
void preprocess_image_bytes(const uint8_t* bytes, int bits, int height, int width, int in_channels,
                            const ImageLoadOptions& opt, float* out);

// One image of a folder or manifest, with its class index.
struct ImageItem {
  std::string file;
  int64_t label;
};
// The files and labels load_image_dataset would load, in its order, without decoding them;
// `classes` receives the class names (`declared` when given: ImageLoadOptions::classes).
// Same errors as load_image_dataset for the layout and the labels.
std::vector<ImageItem> list_images(const std::string& dir, const std::string& split, std::vector<std::string>* classes,
                                   const std::vector<std::string>& declared = {});

// The distinct values of <dir>/manifest.csv's split column, sorted; empty when it has none.
// Throws as list_images for a bad manifest.
std::vector<std::string> manifest_splits(const std::string& dir);

// The class names of a source whose labels are class indices 0..num_classes-1 (a MedMNIST
// .npz): `declared` when given, else "0".."num_classes-1". Throws "<where>: label <k> is not
// one of the classes [a, b] ..." when num_classes exceeds the declared list.
std::vector<std::string> index_class_names(const std::string& where, int64_t num_classes,
                                           const std::vector<std::string>& declared);

// "[a, b, c]" (at most 20 names, then "... (N in all)"), for errors.
std::string class_list_text(const std::vector<std::string>& classes);

// A decoded image: rows x cols x channels (1 gray, 3 RGB), row-major, interleaved, at `bits`
// 8 (one byte a sample) or 16 (native-endian uint16, two bytes a sample, as cv::Mat and HDF5
// hold them).
struct DecodedImage {
  int rows = 0, cols = 0, channels = 1;
  int bits = 8;
  std::vector<uint8_t> pixels;  // rows * cols * channels * bits / 8 bytes
};
// The per-file step of load_image_dataset before preprocess_image: decodes any supported file
// (DICOM through data/dicom.h with opt.dicom_window), converts to gray or RGB, applies
// opt.recipe, and brings the result to opt.bit_depth (above). Throws "<file>: <reason>":
// unreadable or empty, a directory, not decodable, a JPEG without its end-of-image marker
// (truncated: OpenCV would decode it and fill the missing rows), a depth other than 8 or 16
// bits, a DICOM file (DICM at byte 128) named without .dcm or .dicom.
DecodedImage decode_image_file(const std::string& file, const ImageLoadOptions& opt);

// The geometric part of preprocess_image: the pixels converted to `channels` (RGB -> gray
// before the resize; gray is replicated to RGB after it) and resized to size x size with
// INTER_AREA, as size x size x channels uint8. preprocess_image on the result (with
// opt.channels == channels, opt.image_size == size) gives bit for bit what it gives on the
// original pixels.
std::vector<uint8_t> resize_image(const uint8_t* pixels, int height, int width, int in_channels, int channels,
                                  int size);
// The same for an image of either depth: size x size x channels samples at img.bits, as bytes.
std::vector<uint8_t> resize_image(const DecodedImage& img, int channels, int size);
// resize_image to opt.channels and opt.image_size, for an image decoded at opt.bit_depth
// (throws when img.bits differs).
std::vector<uint8_t> resize_image(const DecodedImage& img, const ImageLoadOptions& opt);
// Bytes of a rows x cols x channels image at `bits` (8 or 16).
size_t image_bytes(int64_t rows, int64_t cols, int channels, int bits);

// 8-bit pixels as bit_depth 16 keeps them: v * 257 (exact: 0 -> 0, 255 -> 65535).
DecodedImage widen_to_16_bits(DecodedImage img);

// Throws when opt is invalid (channels not 1 or 3, image_size < 1, mean/std sizes, std <= 0,
// dicom_window not empty or [centre, width >= 1], classes with an empty or repeated name,
// bit_depth not 8 or 16, bit_depth 16 with channels 3).
void check_load_options(const ImageLoadOptions& opt);

}  // namespace lancet
