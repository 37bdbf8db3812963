// image_folder.h — image classification datasets from a folder of image files.
//
// Two layouts (the first that applies wins):
//   1. <dir>/manifest.csv: a header row naming the columns path,label[,split] (any order,
//      extra columns ignored). path is relative to <dir> (or absolute). label is a class
//      name — the class list is the sorted unique names over ALL rows of the manifest, so
//      every split agrees on the indices — or, when every label is a non-negative integer,
//      the class index itself (class names "0".."max").
//   2. Class sub-folders: <dir>/<class>/*.{png,jpg,jpeg,bmp,tif,tiff} (case-insensitive), or
//      <dir>/<split>/<class>/... when split is non-empty. Classes are the sorted folder names;
//      files are taken in sorted name order.
// Every image is decoded, converted to `channels` (1 = grayscale, 3 = RGB; a gray image is
// replicated), resized to image_size x image_size with INTER_AREA, and normalised per
// channel: (pixel / 255 - mean[c]) / std[c]. 16-bit images are scaled to 8 bits first.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace lancet {

struct ImageLoadOptions {
  int channels = 1;                // 1 (grayscale) or 3 (RGB)
  int image_size = 64;             // output H = W
  std::vector<float> mean{0.5f};   // per channel; a single value broadcasts
  std::vector<float> std{0.25f};   // per channel; a single value broadcasts; > 0
};

// Loads the whole split into memory (decoding in parallel). split "" = all rows / the
// classless-split folder layout; otherwise only manifest rows whose split column equals it,
// or the <dir>/<split>/ folder. Errors (lancet::Error, one line): missing dir or split
// folder, bad manifest ("<manifest>:<line>: ..."), empty class folder, no matching rows,
// unreadable or corrupt image ("<file>: <reason>").
std::unique_ptr<InMemoryDataset> load_image_dataset(const std::string& dir, const std::string& split,
                                                    const ImageLoadOptions& opt);

// The per-image step of load_image_dataset, shared with in-memory generators so that they
// produce bit-identical tensors: `pixels` is height x width x in_channels uint8, row-major,
// channel-interleaved (in_channels 1 = gray, 3 = RGB). Writes opt.channels x S x S floats
// (S = opt.image_size, CHW) to `out`.
void preprocess_image(const uint8_t* pixels, int height, int width, int in_channels, const ImageLoadOptions& opt,
                      float* out);

// Throws when opt is invalid (channels not 1 or 3, image_size < 1, mean/std sizes, std <= 0).
void check_load_options(const ImageLoadOptions& opt);

}  // namespace lancet
