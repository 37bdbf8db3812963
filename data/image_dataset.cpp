#include "data/image_dataset.h"

#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <opencv2/core.hpp>

#include "data/npz.h"
#include "data/pack.h"
#include "kernels/parallel.h"

namespace lancet {

BadSample parse_bad_sample(const std::string& s) {
  if (s == "error") return BadSample::error;
  if (s == "skip") return BadSample::skip;
  LANCET_FAIL("data.on_bad_sample must be 'error' or 'skip', got '" << s << "'");
}

CachedImageDataset::CachedImageDataset(std::vector<uint8_t> pixels, std::vector<int64_t> labels,
                                       std::vector<std::string> class_names, std::vector<std::string> names,
                                       const ImageLoadOptions& opt, std::vector<std::string> skipped)
    : pixels_(std::move(pixels)),
      labels_(std::move(labels)),
      class_names_(std::move(class_names)),
      names_(std::move(names)),
      skipped_(std::move(skipped)),
      opt_(opt) {
  check_load_options(opt_);
  per_ = image_bytes(opt_.image_size, opt_.image_size, opt_.channels, opt_.bit_depth);
  LANCET_CHECK(pixels_.size() == labels_.size() * per_ && names_.size() == labels_.size(),
               "CachedImageDataset: " << pixels_.size() << " bytes of pixels and " << names_.size() << " names for "
                                      << labels_.size() << " labels of " << per_ << "-byte images");
  const int64_t k = static_cast<int64_t>(class_names_.size());
  for (size_t i = 0; i < labels_.size(); ++i)
    LANCET_CHECK(labels_[i] >= 0 && labels_[i] < k,
                 names_[i] << ": label " << labels_[i] << " is outside the " << k << " classes");
}

CachedImageDataset::CachedImageDataset(SampleSource source, std::vector<int64_t> labels,
                                       std::vector<std::string> class_names, std::vector<std::string> names,
                                       const ImageLoadOptions& opt)
    : labels_(std::move(labels)),
      class_names_(std::move(class_names)),
      names_(std::move(names)),
      opt_(opt),
      source_(std::move(source)) {
  check_load_options(opt_);
  LANCET_CHECK(source_, "CachedImageDataset: streaming without a sample source");
  per_ = image_bytes(opt_.image_size, opt_.image_size, opt_.channels, opt_.bit_depth);
  LANCET_CHECK(names_.size() == labels_.size(),
               "CachedImageDataset: " << names_.size() << " names for " << labels_.size() << " labels");
  const int64_t k = static_cast<int64_t>(class_names_.size());
  for (size_t i = 0; i < labels_.size(); ++i)
    LANCET_CHECK(labels_[i] >= 0 && labels_[i] < k,
                 names_[i] << ": label " << labels_[i] << " is outside the " << k << " classes");
}

void CachedImageDataset::set_origins(std::vector<std::string> origins) {
  LANCET_CHECK(origins.size() == labels_.size(),
               "CachedImageDataset: " << origins.size() << " origins for " << labels_.size() << " samples");
  origins_ = std::move(origins);
}

const uint8_t* CachedImageDataset::pixels(int64_t i) const {
  LANCET_CHECK(!streaming(), name(i) << ": the dataset streams its samples (data.cache false): no cached pixels");
  return pixels_.data() + static_cast<size_t>(i) * per_;
}

std::vector<uint8_t> CachedImageDataset::image(int64_t i) const {
  if (!streaming()) {
    const uint8_t* p = pixels(i);
    return std::vector<uint8_t>(p, p + per_);
  }
  return resize_image(source_(i), opt_);
}

void CachedImageDataset::get(int64_t i, float* out) const {
  // At the stored size and channels preprocess_image only normalises.
  if (streaming()) {
    const std::vector<uint8_t> img = image(i);
    preprocess_image_bytes(img.data(), bits(), opt_.image_size, opt_.image_size, opt_.channels, opt_, out);
    return;
  }
  preprocess_image_bytes(pixels(i), bits(), opt_.image_size, opt_.image_size, opt_.channels, opt_, out);
}

void CachedImageDataset::get_augmented(int64_t i, const AugmentConfig& cfg, uint64_t seed, int epoch, bool minority,
                                       float* out) const {
  const int s = opt_.image_size;
  std::vector<uint8_t> streamed;
  if (streaming()) streamed = image(i);  // errors name the file already
  try {
    const uint8_t* src = streaming() ? streamed.data() : pixels(i);
    const int type = bits() == 8 ? CV_8UC(opt_.channels) : CV_16UC(opt_.channels);
    cv::Mat img = cv::Mat(s, s, type, const_cast<uint8_t*>(src)).clone();
    augment(img, cfg, seed, epoch, i, minority, s);
    if (!img.isContinuous()) img = img.clone();
    preprocess_image_bytes(img.ptr<uint8_t>(), bits(), s, s, opt_.channels, opt_, out);
  } catch (const std::exception& e) {
    LANCET_FAIL(name(i) << ": " << e.what());
  }
}

namespace {

// Decodes n samples in parallel (decode(i) returns sample i's image at opt.bit_depth, or throws
// "<name>: <reason>"), resizes them into the cache and drops or refuses the bad ones.
// With `stream`, decodes nothing now: decode (which must own what it uses) becomes the
// dataset's sample source.
std::unique_ptr<CachedImageDataset> build(int64_t n, const std::function<DecodedImage(int64_t)>& decode,
                                          std::vector<int64_t> labels, std::vector<std::string> classes,
                                          std::vector<std::string> names, const ImageLoadOptions& opt, BadSample on_bad,
                                          bool stream) {
  // One decode per task across lancet's threads (or, streamed, per loader worker): OpenCV's
  // own threads would oversubscribe the cores, so it runs single-threaded inside each task.
  cv::setNumThreads(0);
  if (stream) {
    LANCET_CHECK(on_bad == BadSample::error,
                 "data.on_bad_sample skip needs data.cache true: bad files are found when the cache is built; a "
                 "streamed dataset stops at the first bad file it reads");
    return std::make_unique<CachedImageDataset>(decode, std::move(labels), std::move(classes), std::move(names), opt);
  }
  const size_t per = image_bytes(opt.image_size, opt.image_size, opt.channels, opt.bit_depth);
  std::vector<uint8_t> pixels(static_cast<size_t>(n) * per);
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<char> bad(static_cast<size_t>(n), 0);
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const size_t u = static_cast<size_t>(i);
      try {  // exceptions must not escape an OpenMP region
        const std::vector<uint8_t> r = resize_image(decode(i), opt);
        std::copy(r.begin(), r.end(), pixels.begin() + static_cast<std::ptrdiff_t>(u * per));
      } catch (const std::exception& ex) {
        bad[u] = 1;
        errors[u] = ex.what();
      }
    }
  });
  std::vector<std::string> skipped;
  size_t kept = 0;
  for (size_t i = 0; i < static_cast<size_t>(n); ++i) {
    if (bad[i]) {
      if (on_bad == BadSample::error) throw Error(errors[i]);  // the first in source order, whatever the threads
      skipped.push_back(std::move(errors[i]));
      continue;
    }
    if (kept != i) {
      std::copy_n(pixels.begin() + static_cast<std::ptrdiff_t>(i * per), per,
                  pixels.begin() + static_cast<std::ptrdiff_t>(kept * per));
      labels[kept] = labels[i];
      names[kept] = std::move(names[i]);
    }
    ++kept;
  }
  pixels.resize(kept * per);
  labels.resize(kept);
  names.resize(kept);
  return std::make_unique<CachedImageDataset>(std::move(pixels), std::move(labels), std::move(classes), std::move(names),
                                              opt, std::move(skipped));
}

std::unique_ptr<CachedImageDataset> load_folder(const std::string& dir, const std::string& split,
                                                const ImageLoadOptions& opt, BadSample on_bad, bool stream) {
  std::vector<std::string> classes;
  auto items = std::make_shared<const std::vector<ImageItem>>(list_images(dir, split, &classes, opt.classes));
  std::vector<int64_t> labels;
  std::vector<std::string> names;
  for (const ImageItem& it : *items) labels.push_back(it.label), names.push_back(it.file);
  return build(static_cast<int64_t>(items->size()),
               [items, opt](int64_t i) { return decode_image_file((*items)[static_cast<size_t>(i)].file, opt); },
               std::move(labels), std::move(classes), std::move(names), opt, on_bad, stream);
}

std::unique_ptr<CachedImageDataset> load_npz(const std::string& path, const std::string& split,
                                             const ImageLoadOptions& opt, BadSample on_bad, bool stream) {
  const NpzFile npz = NpzFile::open(path);
  const std::vector<std::string> splits = npz_splits(npz);
  if (std::find(splits.begin(), splits.end(), split) == splits.end()) {
    std::string present;
    for (const auto& x : splits) present += (present.empty() ? "" : ", ") + x;
    LANCET_FAIL(path << ": no split '" << split << "' (needs members " << split << "_images and " << split
                     << "_labels; splits present: " << (present.empty() ? "none" : present) << ")");
  }
  std::vector<std::string> classes, names;
  std::vector<int64_t> labels = read_npz_labels(npz, split, opt.classes, &classes);
  auto images = std::make_shared<const NpyArray>(read_npz_images(npz, split));
  const int64_t n = images->shape[0];
  LANCET_CHECK(n == static_cast<int64_t>(labels.size()),
               path << ": " << n << " images but " << labels.size() << " labels in split '" << split << "'");
  const std::string where = path + ":" + split + "_images";
  for (int64_t i = 0; i < n; ++i) names.push_back(where + "[" + std::to_string(i) + "]");
  return build(
      n,
      [images, opt, where](int64_t i) {
        try {
          return npz_image(*images, i, opt);
        } catch (const std::exception& e) {
          LANCET_FAIL(where << "[" << i << "]: " << e.what());
        }
      },
      std::move(labels), std::move(classes), names, opt, on_bad, stream);
}

std::unique_ptr<CachedImageDataset> load_pack(const std::string& path, const std::string& split,
                                              const ImageLoadOptions& opt, BadSample on_bad, std::string* note,
                                              bool stream) {
  std::vector<std::string> names;
  if (stream) {
    PackSplit p = check_pack_split(path, split, opt, note);  // hash verified; no pixels kept
    for (int64_t i = 0; i < p.n; ++i) names.push_back(path + ":" + split + "[" + std::to_string(i) + "]");
    auto reader = std::make_shared<const PackReader>(path);
    auto ds = build(
        p.n, [reader, split](int64_t i) { return reader->image(split, i); }, std::move(p.labels),
        std::move(p.classes), std::move(names), opt, on_bad, /*stream=*/true);
    if (!p.sources.empty()) ds->set_origins(std::move(p.sources));
    return ds;
  }
  PackSplit p = read_pack_split(path, split, opt, note);
  for (int64_t i = 0; i < p.n; ++i) names.push_back(path + ":" + split + "[" + std::to_string(i) + "]");
  const size_t per = image_bytes(p.size, p.size, p.channels, p.bits);
  std::unique_ptr<CachedImageDataset> ds;
  if (p.size == opt.image_size && p.channels == opt.channels) {  // as stored: nothing to convert
    ds = std::make_unique<CachedImageDataset>(std::move(p.pixels), std::move(p.labels), std::move(p.classes),
                                              std::move(names), opt);
    if (!p.sources.empty()) ds->set_origins(std::move(p.sources));
    return ds;
  }
  ds = build(
      p.n,
      [&](int64_t i) {
        DecodedImage img;
        img.rows = img.cols = p.size;
        img.channels = p.channels;
        img.bits = p.bits;
        const auto first = p.pixels.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(i) * per);
        img.pixels.assign(first, first + static_cast<std::ptrdiff_t>(per));
        return img;
      },
      std::move(p.labels), std::move(p.classes), std::move(names), opt, on_bad, /*stream=*/false);
  if (!p.sources.empty()) ds->set_origins(std::move(p.sources));  // build drops nothing from a checked pack
  return ds;
}

}  // namespace

std::unique_ptr<CachedImageDataset> load_cached_dataset(const std::string& source, const std::string& split,
                                                        const ImageLoadOptions& opt, BadSample on_bad,
                                                        std::string* note, bool stream) {
  check_load_options(opt);
  switch (source_kind(source)) {
    case SourceKind::folder: return load_folder(source, split, opt, on_bad, stream);
    case SourceKind::pack: return load_pack(source, split, opt, on_bad, note, stream);
    case SourceKind::npz: break;
  }
  return load_npz(source, split, opt, on_bad, stream);
}

}  // namespace lancet
