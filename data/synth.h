// synth.h — synthetic chest-X-ray-like images: the data lancet trains on until a real
// dataset is plugged in, and a fixed, shareable benchmark (no download, no licence).
//
// Each image is a grayscale PA chest film: dark background, body with shoulders and neck,
// two darker lung fields, heart and mediastinum, spine, clavicles, posterior and anterior
// rib arcs, vascular markings, smooth exposure gradients and film noise, with a random
// pose/scale/contrast per image. Class 1 ("opacity") adds 1-3 soft-edged brighter blobs
// inside the lung fields (varying size and contrast, some faint); the image's mean
// intensity is compensated so that it does not give the class away.
//
// Everything is a pure function of (seed, split, index): generating in parallel gives the
// same bytes as generating serially, on any thread count.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/image_folder.h"

namespace lancet {

struct SynthOptions {
  int64_t train = 2000;
  int64_t val = 500;
  int image_size = 128;  // generated (and stored) size; loaders resize from it
  uint64_t seed = 1234;
  double positive_fraction = 0.5;  // exactly round(n * fraction) positives per split (halves down)
};

// Class names of the synthetic data, by label.
const std::vector<std::string>& synth_class_names();  // {"normal", "opacity"}

// One image, row-major uint8 size*size. label 0 = "normal", 1 = "opacity". The anatomy and
// noise depend on (seed, index) only, so the two labels of one (seed, index) differ only by
// the opacities (and the brightness compensation).
std::vector<uint8_t> synth_cxr_image(int size, int label, uint64_t seed, int64_t index);

// The label and the synth_cxr_image seed of image `index` of `split` ("train" or "val").
int synth_label(const SynthOptions& opt, int64_t index);
uint64_t synth_split_seed(const SynthOptions& opt, const std::string& split);

// Writes <dir>/{train,val}/{normal,opacity}/<index>.png and <dir>/manifest.csv
// (path,label,split; rows in index order, train then val). Built in "<dir>.tmp-<pid>" and
// renamed onto <dir> at the end, so an interrupted run leaves no half dataset. Refuses to
// replace an existing non-empty <dir> unless `overwrite`.
void write_synthetic_cxr(const std::string& dir, const SynthOptions& opt, bool overwrite = false);

// The same images in memory, normalised exactly as load_image_dataset would load the
// written folder (generated at opt.image_size, resized to load.image_size when different).
std::unique_ptr<InMemoryDataset> make_synthetic_cxr(const SynthOptions& opt, const std::string& split,
                                                    const ImageLoadOptions& load);

}  // namespace lancet
