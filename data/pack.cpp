#include "data/pack.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <opencv2/core.hpp>
#include <ostream>

#include "data/dicom.h"
#include "data/h5file.h"
#include "data/npz.h"
#include "kernels/error.h"
#include "kernels/parallel.h"

namespace fs = std::filesystem;

namespace lancet {

uint64_t fnv1a64(const uint8_t* bytes, size_t n, uint64_t h) {
  for (size_t i = 0; i < n; ++i) h = (h ^ bytes[i]) * 1099511628211ull;
  return h;
}

namespace {

// The hash is over the stored bytes as this machine holds them; uint16 packs promise
// little-endian samples.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "pack hashes assume a little-endian machine");

constexpr const char* kFormat = "lancet-pack";
constexpr const char* kVersion = "2";

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t hash_labels(const std::vector<int64_t>& labels, uint64_t h) {
  for (int64_t l : labels) {
    uint8_t b[8];
    for (int k = 0; k < 8; ++k) b[k] = static_cast<uint8_t>(static_cast<uint64_t>(l) >> (8 * k));
    h = fnv1a64(b, 8, h);
  }
  return h;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// One split of a source: its labels, where each image comes from (a file, or an array
// element of an .npz) and a thread-safe decoder of image i (to gray/RGB at opt.bit_depth with
// the recipe applied; errors name the file or array element).
struct SplitSource {
  std::vector<int64_t> labels;
  std::vector<std::string> names;
  std::function<DecodedImage(int64_t)> decode;
};

class Source {
 public:
  Source(const std::string& path, const ImageLoadOptions& opt) : path_(path), opt_(opt) {
    std::error_code ec;
    LANCET_CHECK(fs::exists(path, ec), path << ": no such directory or .npz file");
    const SourceKind kind = source_kind(path);
    LANCET_CHECK(kind != SourceKind::pack, path << ": a pack from lancet prep already (train from it as it is; "
                                                   "lancet prep reads folders, CSV manifests and .npz archives)");
    if (kind == SourceKind::npz) npz_ = std::make_shared<NpzFile>(NpzFile::open(path));
  }

  std::vector<std::string> available(const std::vector<std::string>& wanted) const {
    std::vector<std::string> out;
    for (const auto& s : wanted)
      if (has(s)) out.push_back(s);
    return out;
  }

  bool has(const std::string& split) const {
    if (npz_) {
      const auto s = npz_splits(*npz_);
      return std::find(s.begin(), s.end(), split) != s.end();
    }
    if (!fs::exists(fs::path(path_) / "manifest.csv")) return fs::is_directory(fs::path(path_) / split);
    // Errors of the whole manifest (its header, a label outside the classes) are not a missing
    // split: they propagate. Then the split is missing exactly when selecting it fails.
    std::vector<std::string> classes;
    list_images(path_, "", &classes, opt_.classes);
    try {
      list_images(path_, split, &classes, opt_.classes);
      return true;
    } catch (const Error&) {
      return false;
    }
  }

  // The split's items; `classes` receives the class names.
  SplitSource open(const std::string& split, std::vector<std::string>* classes) const {
    SplitSource s;
    if (npz_) {
      s.labels = read_npz_labels(*npz_, split, opt_.classes, classes);
      auto images = std::make_shared<NpyArray>(read_npz_images(*npz_, split));
      LANCET_CHECK(images->shape[0] == static_cast<int64_t>(s.labels.size()),
                   path_ << ": " << images->shape[0] << " images but " << s.labels.size() << " labels in split '"
                         << split << "'");
      const std::string where = path_ + ":" + split + "_images";
      for (size_t i = 0; i < s.labels.size(); ++i) s.names.push_back(where + "[" + std::to_string(i) + "]");
      const ImageLoadOptions opt = opt_;
      s.decode = [images, where, opt](int64_t i) {
        try {
          return npz_image(*images, i, opt);
        } catch (const Error& e) {
          LANCET_FAIL(where << "[" << i << "]: " << e.what());
        }
      };
      return s;
    }
    auto items = std::make_shared<std::vector<ImageItem>>(list_images(path_, split, classes, opt_.classes));
    for (const auto& it : *items) s.labels.push_back(it.label), s.names.push_back(it.file);
    const ImageLoadOptions opt = opt_;
    s.decode = [items, opt](int64_t i) { return decode_image_file((*items)[static_cast<size_t>(i)].file, opt); };
    return s;
  }

 private:
  std::string path_;
  ImageLoadOptions opt_;
  std::shared_ptr<NpzFile> npz_;
};

std::string recipe_fingerprint(const ImageLoadOptions& opt) {
  return opt.recipe ? opt.recipe->fingerprint() : PreprocessRecipe().fingerprint();
}
std::string recipe_json(const ImageLoadOptions& opt) {
  return (opt.recipe ? opt.recipe->to_json() : PreprocessRecipe().to_json()).dump();
}
// `name` relative to the folder `source` when it lies inside it, else as it is.
std::string relative_to(const std::string& name, const std::string& source) {
  const fs::path rel = fs::path(name).lexically_relative(source);
  return rel.empty() || *rel.begin() == ".." ? name : rel.string();
}

const char* dtype_name(int bits) { return bits == 16 ? "uint16" : "uint8"; }
H5File::Elem elem_of(int bits) { return bits == 16 ? H5File::Elem::u16 : H5File::Elem::u8; }

// data.dicom.window as the pack records it, and as errors show it.
std::string window_json(const std::vector<double>& w) { return Json(w).dump(); }
std::string window_text(const std::vector<double>& w) {
  return w.empty() ? "null (each file's own window, else min-max)" : window_json(w);
}

int attr_int(const H5File& f, const char* name) {
  const auto v = f.get_attr("/", name);
  LANCET_CHECK(v, f.path() << ": pack attribute '" << name << "' missing");
  try {
    return std::stoi(*v);
  } catch (const std::exception&) {
    LANCET_FAIL(f.path() << ": pack attribute '" << name << "' is not an integer: '" << *v << "'");
  }
}

PackInfo read_info(const H5File& f) {
  const std::string& path = f.path();
  const auto format = f.get_attr("/", "format");
  LANCET_CHECK(format && *format == kFormat, path << ": not a lancet pack (no format=\"" << kFormat
                                                  << "\" attribute; packs are written by lancet prep)");
  const auto version = f.get_attr("/", "version");
  LANCET_CHECK(version && *version == kVersion,
               path << ": pack version " << version.value_or("?") << " is not supported (this lancet reads version "
                    << kVersion << "; run lancet prep again)");
  PackInfo info;
  info.image_size = attr_int(f, "image_size");
  info.channels = attr_int(f, "channels");
  info.recipe = f.get_attr("/", "recipe").value_or("[]");
  info.recipe_fingerprint = f.get_attr("/", "recipe_fingerprint").value_or("");
  try {
    info.dicom_window = Json::parse(f.get_attr("/", "dicom_window").value_or("")).get<std::vector<double>>();
  } catch (const std::exception&) {
    LANCET_FAIL(path << ": pack attribute 'dicom_window' is missing or not a JSON list of numbers");
  }
  info.dicom_files = attr_int(f, "dicom_files");
  info.source = f.get_attr("/", "source").value_or("");
  const std::string dtype = f.get_attr("/", "dtype").value_or("?");
  LANCET_CHECK(dtype == "uint8" || dtype == "uint16",
               path << ": pack pixel type " << dtype << " is not supported (uint8 or uint16)");
  info.bit_depth = dtype == "uint16" ? 16 : 8;
  LANCET_CHECK(info.bit_depth == 8 || info.channels == 1,
               path << ": a uint16 pack with " << info.channels << " channels (16-bit packs are grayscale)");
  try {
    info.classes = Json::parse(f.get_attr("/", "classes").value_or("")).get<std::vector<std::string>>();
  } catch (const std::exception&) {
    LANCET_FAIL(path << ": pack attribute 'classes' is missing or not a JSON list of names");
  }
  // Stale: the recipe's ops produce other pixels in this lancet than when the pack was made.
  std::string now;
  try {
    now = PreprocessRecipe::from_json(Json::parse(info.recipe), "pack recipe").fingerprint();
  } catch (const std::exception& e) {
    LANCET_FAIL(path << ": the pack's preprocessing recipe is not valid here (stale pack; run lancet prep again): "
                     << e.what());
  }
  LANCET_CHECK(now == info.recipe_fingerprint,
               path << ": stale pack: made with recipe fingerprint " << info.recipe_fingerprint
                    << ", which this lancet computes as " << now << " (its ops changed; run lancet prep again)");
  for (const auto& name : f.list("/"))
    if (f.has(name + "/images") && f.has(name + "/labels")) info.splits.push_back(name);
  return info;
}

}  // namespace

bool is_pack_path(const std::string& path) {
  const std::string ext = fs::path(path).extension().string();
  return ext == ".h5" || ext == ".hdf5";
}

std::vector<PackSplitSummary> write_pack(const std::string& source, const std::string& out, const PackOptions& opt) {
  check_load_options(opt.load);
  LANCET_CHECK(opt.gzip >= 0 && opt.gzip <= 9, "--compress must be a gzip level 0-9, got " << opt.gzip);
  LANCET_CHECK(opt.block >= 1, "pack block size must be positive");
  LANCET_CHECK(opt.progress_every >= 0, "pack progress interval must be >= 0, got " << opt.progress_every);
  LANCET_CHECK(fs::absolute(source) != fs::absolute(out), out << ": the pack cannot replace its source");
  const Source src(source, opt.load);
  std::vector<std::string> splits = opt.splits;
  if (splits.empty()) {
    splits = src.available({"train", "val", "test"});
    if (splits.empty() && fs::exists(fs::path(source) / "manifest.csv")) {
      const std::vector<std::string> present = manifest_splits(source);
      LANCET_CHECK(!present.empty(), (fs::path(source) / "manifest.csv").string()
                                         << ": no split column; a pack holds named splits: add a split column "
                                            "(path,label,split)");
      LANCET_FAIL(source << ": no train, val or test split; the manifest's split column has "
                         << class_list_text(present) << ": name the splits to pack with --splits");
    }
    LANCET_CHECK(!splits.empty(), source << ": no train, val or test split (sub-folders, a manifest split column or "
                                            "<split>_images arrays); name the splits to pack with --splits");
  }
  for (const auto& s : splits) {
    LANCET_CHECK(!s.empty() && s.find('/') == std::string::npos, "bad split name '" << s << "'");
    LANCET_CHECK(src.has(s), source << ": no split '" << s << "'");
  }

  // One image per task across lancet's threads (--threads): OpenCV's own threads (CLAHE,
  // resize) would oversubscribe the cores and make --threads 1 no serial baseline.
  cv::setNumThreads(0);
  for (const auto& f : remove_stale_temp_files_of(out))
    if (opt.log) *opt.log << "prep: removed " << f << " (left by a killed prep)\n";
  const int S = opt.load.image_size, C = opt.load.channels, bits = opt.load.bit_depth;
  const int64_t per = static_cast<int64_t>(image_bytes(S, S, C, bits));
  H5File f = H5File::create_atomic(out);  // discarded (temporary file deleted) unless committed
  std::vector<std::string> classes;
  std::vector<PackSplitSummary> summary;
  int64_t dicom_files = 0;
  using Clock = std::chrono::steady_clock;
  for (const auto& split : splits) {
    std::vector<std::string> split_classes;
    const SplitSource s = src.open(split, &split_classes);
    if (classes.empty()) classes = split_classes;
    LANCET_CHECK(split_classes == classes, source << ": split '" << split << "' has classes [" << join(split_classes)
                                                  << "] but '" << splits.front() << "' has [" << join(classes) << "]");
    const int64_t n = static_cast<int64_t>(s.labels.size());
    LANCET_CHECK(n > 0, source << ": split '" << split << "' has no images");
    if (opt.log) *opt.log << "prep: " << split << ": " << n << " images from " << source << "\n" << std::flush;
    const std::string images = split + "/images";
    const Shape dims = C == 1 ? Shape{n, S, S} : Shape{n, S, S, C};
    Shape chunk = dims;
    chunk[0] = 1;
    f.create_chunked(images, elem_of(bits), dims, chunk, opt.gzip);
    PackSplitSummary sum;
    sum.name = split;
    std::vector<int64_t> labels;        // of the images kept, in source order
    std::vector<std::string> sources;  // their files, relative to the packed folder
    uint64_t h = kFnvOffset;
    std::vector<uint8_t> block;
    const auto t0 = Clock::now();
    int64_t next_progress = opt.progress_every;
    for (int64_t b0 = 0; b0 < n; b0 += opt.block) {
      const int64_t bn = std::min(opt.block, n - b0);
      block.assign(static_cast<size_t>(bn * per), 0);
      std::vector<std::string> errors(static_cast<size_t>(bn));
      parallel_for(bn, 1, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          try {  // exceptions must not escape an OpenMP region
            const std::vector<uint8_t> px = resize_image(s.decode(b0 + j), opt.load);
            std::memcpy(block.data() + j * per, px.data(), px.size());
          } catch (const std::exception& e) {
            errors[static_cast<size_t>(j)] = e.what();
            if (errors[static_cast<size_t>(j)].empty()) errors[static_cast<size_t>(j)] = "unknown error";
          }
        }
      });
      // Keep the good images, in order, at the front of the block; the first bad one stops the
      // prep (on_bad error) whatever the thread count, else every bad one is listed.
      int64_t kept = 0;
      for (int64_t j = 0; j < bn; ++j) {
        const std::string& error = errors[static_cast<size_t>(j)];
        if (!error.empty()) {
          if (opt.on_bad == BadSample::error) throw Error(error);
          sum.skipped.push_back(error);
          continue;
        }
        if (kept != j) std::memmove(block.data() + kept * per, block.data() + j * per, static_cast<size_t>(per));
        labels.push_back(s.labels[static_cast<size_t>(b0 + j)]);
        sources.push_back(relative_to(s.names[static_cast<size_t>(b0 + j)], source));
        if (is_dicom_path(s.names[static_cast<size_t>(b0 + j)])) ++dicom_files;
        ++kept;
      }
      f.write_rows(images, sum.count, kept, elem_of(bits), block.data());
      h = fnv1a64(block.data(), static_cast<size_t>(kept * per), h);
      sum.count += kept;
      const int64_t done = b0 + bn;
      if (opt.log && opt.progress_every > 0 && done >= next_progress && done < n) {
        const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
        char rate[32];
        std::snprintf(rate, sizeof rate, "%.0f", sec > 0 ? static_cast<double>(done) / sec : 0.0);
        *opt.log << (opt.progress_tty ? "\r\033[K" : "") << "prep: " << split << ": " << done << "/" << n << " images ("
                 << done * 100 / n << "%), " << rate << " images/s" << (opt.progress_tty ? "" : "\n") << std::flush;
        next_progress = (done / opt.progress_every + 1) * opt.progress_every;
      }
    }
    if (opt.log && opt.progress_tty && opt.progress_every > 0 && n > opt.progress_every) *opt.log << "\r\033[K";
    LANCET_CHECK(sum.count > 0, source << ": split '" << split << "' has no readable image (" << sum.skipped.size()
                                       << " skipped; the first: " << sum.skipped.front() << ")");
    if (sum.count < n) f.shrink_rows(images, sum.count);
    h = hash_labels(labels, h);
    Tensor lt = Tensor::empty({sum.count}, DType::i64);
    std::copy(labels.begin(), labels.end(), lt.data<int64_t>());
    f.write(split + "/labels", lt);
    const std::string listed = Json(sources).dump();
    Tensor st = Tensor::empty({static_cast<int64_t>(listed.size())}, DType::u8);
    std::copy(listed.begin(), listed.end(), st.data<uint8_t>());
    f.write(split + "/sources", st);
    sum.hash = hex16(h);
    sum.per_class.assign(classes.size(), 0);
    for (int64_t l : labels)
      if (l >= 0 && l < static_cast<int64_t>(classes.size())) ++sum.per_class[static_cast<size_t>(l)];
    f.set_attr(split, "hash", sum.hash);
    f.set_attr(split, "skipped", std::to_string(sum.skipped.size()));
    f.set_attr(split, "skipped_files", Json(sum.skipped).dump());
    if (opt.log) {
      const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
      char line[96];
      std::snprintf(line, sizeof line, " in %.1f s (%.0f images/s)", sec, sec > 0 ? static_cast<double>(n) / sec : 0.0);
      *opt.log << "prep: " << split << ": " << n << " images" << line << "\n" << std::flush;
    }
    summary.push_back(std::move(sum));
  }
  f.set_attr("/", "format", kFormat);
  f.set_attr("/", "version", kVersion);
  f.set_attr("/", "classes", Json(classes).dump());
  f.set_attr("/", "image_size", std::to_string(S));
  f.set_attr("/", "channels", std::to_string(C));
  f.set_attr("/", "dtype", dtype_name(bits));
  f.set_attr("/", "recipe", recipe_json(opt.load));
  f.set_attr("/", "recipe_fingerprint", recipe_fingerprint(opt.load));
  f.set_attr("/", "dicom_window", window_json(opt.load.dicom_window));
  f.set_attr("/", "dicom_files", std::to_string(dicom_files));
  f.set_attr("/", "source", source);
  f.set_attr("/", "hash_algorithm", "fnv1a64");
  f.commit();
  if (opt.log) {
    *opt.log << "prep: wrote " << out << " (" << fs::file_size(out) / 1024 << " KiB; " << S << "x" << S << "x" << C
             << " " << dtype_name(bits) << ", recipe " << recipe_fingerprint(opt.load) << (opt.gzip ? ", gzip " + std::to_string(opt.gzip) : "");
    if (dicom_files > 0) *opt.log << "; " << dicom_files << " DICOM, window " << window_text(opt.load.dicom_window);
    *opt.log << ")\n";
    size_t skipped = 0;
    for (const auto& s : summary) {
      *opt.log << "  " << s.name << ": " << s.count << " images (";
      for (size_t k = 0; k < classes.size(); ++k) *opt.log << (k ? ", " : "") << classes[k] << " " << s.per_class[k];
      *opt.log << "), hash " << s.hash;
      if (!s.skipped.empty()) *opt.log << "; " << s.skipped.size() << " bad image(s) skipped";
      *opt.log << "\n";
      skipped += s.skipped.size();
    }
    if (skipped > 0) {
      *opt.log << "prep: --on-bad-sample skip: " << skipped << " bad image(s) left out of the pack:\n";
      for (const auto& s : summary)
        for (const auto& e : s.skipped) *opt.log << "  " << s.name << ": " << e << "\n";
    }
  }
  return summary;
}

PackInfo read_pack_info(const std::string& path) { return read_info(H5File::open_read(path)); }

namespace {
PackSplit read_split(const std::string& path, const std::string& split, const ImageLoadOptions& opt,
                     std::string* note, bool keep_pixels) {
  check_load_options(opt);
  const H5File f = H5File::open_read(path);
  const PackInfo info = read_info(f);
  LANCET_CHECK(std::find(info.splits.begin(), info.splits.end(), split) != info.splits.end(),
               path << ": the pack has no split '" << split << "' (it has: " << join(info.splits) << ")");
  const std::string want = recipe_fingerprint(opt);
  LANCET_CHECK(want == info.recipe_fingerprint,
               path << ": the pack was made with preprocessing recipe " << info.recipe << " (" << info.recipe_fingerprint
                    << ") but data.preprocess is " << recipe_json(opt) << " (" << want
                    << "): run lancet prep again, or set data.preprocess to the pack's recipe");
  // The window changes a DICOM's pixels as much as the recipe does (it is not part of the
  // recipe: it applies before it, to DICOM files only, so packs without DICOMs ignore it).
  LANCET_CHECK(info.dicom_files == 0 || info.dicom_window == opt.dicom_window,
               path << ": the pack's " << info.dicom_files << " DICOM image(s) were decoded with data.dicom.window "
                    << window_text(info.dicom_window) << " but data.dicom.window is " << window_text(opt.dicom_window)
                    << ": run lancet prep again, or set data.dicom.window to the pack's");
  LANCET_CHECK(info.bit_depth == opt.bit_depth,
               path << ": the pack holds " << info.bit_depth << "-bit images (dtype " << dtype_name(info.bit_depth)
                    << ") but data.bit_depth is " << opt.bit_depth << ": set data.bit_depth " << info.bit_depth
                    << ", or run lancet prep again with data.bit_depth " << opt.bit_depth);
  // The pack's label indices mean its classes, in its order: another declared list (names or
  // order) would silently relabel every sample.
  LANCET_CHECK(opt.classes.empty() || opt.classes == info.classes,
               path << ": the pack's classes are " << class_list_text(info.classes) << " but data.classes is "
                    << class_list_text(opt.classes)
                    << ": run lancet prep again with this data.classes, or set data.classes to the pack's");
  const std::string images = split + "/images";
  const Shape shape = f.shape_of(images);
  const int S = info.image_size, C = info.channels, bits = info.bit_depth;
  const Shape expect = C == 1 ? Shape{shape.empty() ? 0 : shape[0], S, S} : Shape{shape.empty() ? 0 : shape[0], S, S, C};
  LANCET_CHECK(shape == expect && f.element_size_of(images) == bits / 8,
               path << ": dataset '" << images << "' does not match the pack's image_size " << S << ", channels " << C
                    << " and dtype " << dtype_name(bits));
  PackSplit out;
  out.n = shape[0];
  out.size = S;
  out.channels = C;
  out.bits = bits;
  out.classes = info.classes;
  uint64_t h = kFnvOffset;
  const int64_t per = static_cast<int64_t>(image_bytes(S, S, C, bits));
  if (keep_pixels) {
    out.pixels.resize(static_cast<size_t>(out.n * per));
    f.read_rows(images, 0, out.n, elem_of(bits), out.pixels.data());
    h = fnv1a64(out.pixels.data(), out.pixels.size());
  } else {  // the same hash in blocks of rows, keeping nothing
    const int64_t block = std::max<int64_t>(1, (int64_t{64} << 20) / per);
    std::vector<uint8_t> buf;
    for (int64_t r = 0; r < out.n; r += block) {
      const int64_t m = std::min(block, out.n - r);
      buf.resize(static_cast<size_t>(m * per));
      f.read_rows(images, r, m, elem_of(bits), buf.data());
      h = fnv1a64(buf.data(), buf.size(), h);
    }
  }
  const Tensor lt = f.read(split + "/labels");
  LANCET_CHECK(lt.dtype() == DType::i64 && lt.ndim() == 1 && lt.dim(0) == out.n,
               path << ": '" << split << "/labels' must be int64 [" << out.n << "]");
  out.labels.assign(lt.data<int64_t>(), lt.data<int64_t>() + out.n);
  const std::string hash = hex16(hash_labels(out.labels, h));
  const std::string stored = f.get_attr(split, "hash").value_or("(none)");
  LANCET_CHECK(hash == stored, path << ": split '" << split << "' is damaged or was modified: content hash " << hash
                                    << ", the pack says " << stored << " (run lancet prep again)");
  const int64_t k = static_cast<int64_t>(info.classes.size());
  for (int64_t i = 0; i < out.n; ++i)
    LANCET_CHECK(out.labels[static_cast<size_t>(i)] >= 0 && out.labels[static_cast<size_t>(i)] < k,
                 path << ": label " << out.labels[static_cast<size_t>(i)] << " of " << split << " sample " << i
                      << " is outside the " << k << " classes");
  if (f.has(split + "/sources")) {
    const Tensor st = f.read(split + "/sources");
    LANCET_CHECK(st.dtype() == DType::u8 && st.ndim() == 1, path << ": '" << split << "/sources' must be uint8 [bytes]");
    try {
      out.sources = Json::parse(std::string(st.data<uint8_t>(), st.data<uint8_t>() + st.numel()))
                        .get<std::vector<std::string>>();
    } catch (const std::exception&) {
      LANCET_FAIL(path << ": '" << split << "/sources' is damaged (not a JSON list of file names; run lancet prep again)");
    }
    LANCET_CHECK(static_cast<int64_t>(out.sources.size()) == out.n,
                 path << ": '" << split << "/sources' names " << out.sources.size() << " files for " << out.n
                      << " images (damaged; run lancet prep again)");
  }
  // Images that lancet prep --on-bad-sample skip left out: training from the pack says so too.
  const std::string left_out = f.get_attr(split, "skipped").value_or("0");
  if (note)
    *note = "pack " + path + ": split " + split + ", " + std::to_string(out.n) + " images " + std::to_string(S) + "x" +
            std::to_string(S) + "x" + std::to_string(C) + " " + dtype_name(bits) +
            (S != opt.image_size || C != opt.channels ? " (converted to the configured size)" : "") + ", recipe " +
            info.recipe_fingerprint +
            (info.dicom_files > 0 ? ", DICOM window " + window_text(info.dicom_window) : std::string()) +
            ", content hash " + hash + " verified" +
            (keep_pixels ? "" : "; images read from the pack as needed (data.cache false)") +
            (left_out == "0" ? "" : "; " + left_out + " bad source image(s) left out by lancet prep (listed in the split's "
                                    "skipped_files attribute)");
  return out;
}
}  // namespace

PackSplit read_pack_split(const std::string& path, const std::string& split, const ImageLoadOptions& opt,
                          std::string* note) {
  return read_split(path, split, opt, note, /*keep_pixels=*/true);
}

PackSplit check_pack_split(const std::string& path, const std::string& split, const ImageLoadOptions& opt,
                           std::string* note) {
  return read_split(path, split, opt, note, /*keep_pixels=*/false);
}

std::unique_ptr<InMemoryDataset> load_pack_dataset(const std::string& path, const std::string& split,
                                                   const ImageLoadOptions& opt, std::string* note) {
  PackSplit p = read_pack_split(path, split, opt, note);
  const int64_t n = p.n, per = static_cast<int64_t>(image_bytes(p.size, p.size, p.channels, p.bits));
  const int64_t s = opt.image_size;
  const int64_t out_per = opt.channels * s * s;
  Tensor t = Tensor::empty({n, opt.channels, s, s});
  float* base = t.data<float>();
  parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      preprocess_image_bytes(p.pixels.data() + i * per, p.bits, p.size, p.size, p.channels, opt, base + i * out_per);
  });
  return std::make_unique<InMemoryDataset>(std::move(t), std::move(p.labels), std::move(p.classes));
}

// ---- random access ----------------------------------------------------------------------

struct PackReader::Impl {
  H5File file;
  std::map<std::string, std::vector<int64_t>> labels;
};

PackReader::PackReader(const std::string& path) : impl_(new Impl{H5File::open_read(path), {}}) {
  info_ = read_info(impl_->file);
  for (const auto& s : info_.splits) {
    const Tensor t = impl_->file.read(s + "/labels");
    LANCET_CHECK(t.dtype() == DType::i64 && t.ndim() == 1, path << ": '" << s << "/labels' must be int64 [N]");
    impl_->labels[s].assign(t.data<int64_t>(), t.data<int64_t>() + t.dim(0));
  }
}

PackReader::~PackReader() = default;

int64_t PackReader::size(const std::string& split) const {
  const auto it = impl_->labels.find(split);
  LANCET_CHECK(it != impl_->labels.end(), impl_->file.path() << ": the pack has no split '" << split << "'");
  return static_cast<int64_t>(it->second.size());
}

int64_t PackReader::label(const std::string& split, int64_t i) const {
  const int64_t n = size(split);
  LANCET_CHECK(i >= 0 && i < n, impl_->file.path() << ": index " << i << " outside split '" << split << "' of " << n);
  return impl_->labels.at(split)[static_cast<size_t>(i)];
}

DecodedImage PackReader::image(const std::string& split, int64_t i) const {
  label(split, i);  // checks the split and the index
  DecodedImage img;
  img.rows = img.cols = info_.image_size;
  img.channels = info_.channels;
  img.bits = info_.bit_depth;
  img.pixels.resize(image_bytes(img.rows, img.cols, img.channels, img.bits));
  impl_->file.read_rows(split + "/images", i, 1, elem_of(img.bits), img.pixels.data());
  return img;
}

}  // namespace lancet
