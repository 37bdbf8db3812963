#include "data/image_folder.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <set>

#include "data/dicom.h"
#include "kernels/parallel.h"

namespace fs = std::filesystem;

namespace lancet {

void check_load_options(const ImageLoadOptions& opt) {
  LANCET_CHECK(opt.channels == 1 || opt.channels == 3, "image channels must be 1 or 3, got " << opt.channels);
  LANCET_CHECK(opt.image_size >= 1, "image size must be positive, got " << opt.image_size);
  const size_t c = static_cast<size_t>(opt.channels);
  LANCET_CHECK(opt.mean.size() == 1 || opt.mean.size() == c,
               "normalisation mean needs 1 or " << c << " values, got " << opt.mean.size());
  LANCET_CHECK(opt.std.size() == 1 || opt.std.size() == c,
               "normalisation std needs 1 or " << c << " values, got " << opt.std.size());
  for (float s : opt.std) LANCET_CHECK(s > 0, "normalisation std must be positive, got " << s);
  LANCET_CHECK(opt.dicom_window.empty() || (opt.dicom_window.size() == 2 && opt.dicom_window[1] >= 1),
               "the DICOM window must be [centre, width] with width >= 1, got " << opt.dicom_window.size() << " values"
                   << (opt.dicom_window.size() == 2 ? ", width " + std::to_string(opt.dicom_window[1]) : ""));
  const std::set<std::string> distinct(opt.classes.begin(), opt.classes.end());
  for (const auto& c : opt.classes)
    LANCET_CHECK(!c.empty(), "data.classes " << class_list_text(opt.classes) << " has an empty class name");
  LANCET_CHECK(distinct.size() == opt.classes.size(),
               "data.classes " << class_list_text(opt.classes) << " names a class more than once");
  LANCET_CHECK(opt.bit_depth == 8 || opt.bit_depth == 16, "data.bit_depth must be 8 or 16, got " << opt.bit_depth);
  LANCET_CHECK(opt.bit_depth == 8 || opt.channels == 1,
               "data.bit_depth 16 is for grayscale images (data.channels 1): colour images are kept at 8 bits");
}

std::string class_list_text(const std::vector<std::string>& classes) {
  std::string s = "[";
  for (size_t k = 0; k < classes.size() && k < 20; ++k) s += (k ? ", " : "") + classes[k];
  if (classes.size() > 20) s += ", ... (" + std::to_string(classes.size()) + " in all)";
  return s + "]";
}

std::vector<std::string> index_class_names(const std::string& where, int64_t num_classes,
                                           const std::vector<std::string>& declared) {
  if (declared.empty()) {
    std::vector<std::string> names;
    for (int64_t k = 0; k < num_classes; ++k) names.push_back(std::to_string(k));
    return names;
  }
  const int64_t k = static_cast<int64_t>(declared.size());
  LANCET_CHECK(num_classes <= k, where << ": label " << num_classes - 1 << " is not one of the classes "
                                       << class_list_text(declared) << " (class indices 0-" << k - 1
                                       << " of data.classes)");
  return declared;
}

namespace {

// preprocess_image on a CV_8U or CV_16U image: to opt.channels, resized, normalised.
void preprocess_mat(cv::Mat m, const ImageLoadOptions& opt, float* out) {
  if (opt.channels == 1 && m.channels() == 3) cv::cvtColor(m, m, cv::COLOR_RGB2GRAY);
  // Resize before replicating gray to RGB: the result depends only on the gray pixels.
  const int s = opt.image_size;
  if (m.rows != s || m.cols != s) cv::resize(m, m, cv::Size(s, s), 0, 0, cv::INTER_AREA);
  if (!m.isContinuous()) m = m.clone();
  const size_t mc = static_cast<size_t>(m.channels());
  const size_t plane = static_cast<size_t>(s) * static_cast<size_t>(s);
  for (int c = 0; c < opt.channels; ++c) {
    const float mean = opt.mean[opt.mean.size() == 1 ? 0 : static_cast<size_t>(c)];
    const float sd = opt.std[opt.std.size() == 1 ? 0 : static_cast<size_t>(c)];
    const size_t sc = mc == 1 ? 0 : static_cast<size_t>(c);
    float* o = out + static_cast<size_t>(c) * plane;
    // Computed per pixel rather than looked up in a 256-entry table: the same floats (the
    // same expression), and the loop vectorises where a table gather does not.
    if (m.depth() == CV_8U) {
      const uint8_t* src = m.ptr<uint8_t>();
      for (size_t i = 0; i < plane; ++i) o[i] = (static_cast<float>(src[i * mc + sc]) / 255.0f - mean) / sd;
    } else {
      const uint16_t* src = m.ptr<uint16_t>();
      for (size_t i = 0; i < plane; ++i) o[i] = (static_cast<float>(src[i * mc + sc]) / 65535.0f - mean) / sd;
    }
  }
}

// resize_image on a CV_8U or CV_16U image, as bytes at its depth.
std::vector<uint8_t> resize_mat(cv::Mat m, int channels, int size) {
  LANCET_CHECK((m.channels() == 1 || m.channels() == 3) && (channels == 1 || channels == 3),
               "resize_image: channels must be 1 or 3");
  // The same steps, in the same order, as preprocess_image.
  if (channels == 1 && m.channels() == 3) cv::cvtColor(m, m, cv::COLOR_RGB2GRAY);
  if (m.rows != size || m.cols != size) cv::resize(m, m, cv::Size(size, size), 0, 0, cv::INTER_AREA);
  if (channels == 3 && m.channels() == 1) cv::cvtColor(m, m, cv::COLOR_GRAY2RGB);
  if (!m.isContinuous()) m = m.clone();
  return std::vector<uint8_t>(m.ptr<uint8_t>(), m.ptr<uint8_t>() + m.total() * m.elemSize());
}

// A view of img's pixels (no copy).
cv::Mat image_mat(const DecodedImage& img) {
  LANCET_CHECK(img.bits == 8 || img.bits == 16, "image depth must be 8 or 16 bits, got " << img.bits);
  LANCET_CHECK(img.channels == 1 || img.channels == 3, "image channels must be 1 or 3, got " << img.channels);
  const size_t bytes = image_bytes(img.rows, img.cols, img.channels, img.bits);
  LANCET_CHECK(img.rows > 0 && img.cols > 0 && img.pixels.size() == bytes,
               "image of " << img.rows << "x" << img.cols << "x" << img.channels << " at " << img.bits << " bits holds "
                           << img.pixels.size() << " bytes");
  return cv::Mat(img.rows, img.cols, img.bits == 8 ? CV_8UC(img.channels) : CV_16UC(img.channels),
                 const_cast<uint8_t*>(img.pixels.data()));
}

DecodedImage from_mat(cv::Mat m) {
  if (!m.isContinuous()) m = m.clone();
  DecodedImage out;
  out.rows = m.rows, out.cols = m.cols, out.channels = m.channels(), out.bits = m.depth() == CV_8U ? 8 : 16;
  out.pixels.assign(m.ptr<uint8_t>(), m.ptr<uint8_t>() + m.total() * m.elemSize());
  return out;
}

}  // namespace

void preprocess_image(const uint8_t* pixels, int height, int width, int in_channels, const ImageLoadOptions& opt,
                      float* out) {
  LANCET_CHECK(in_channels == 1 || in_channels == 3, "preprocess_image: in_channels must be 1 or 3");
  preprocess_mat(cv::Mat(height, width, CV_8UC(in_channels), const_cast<uint8_t*>(pixels)), opt, out);
}

void preprocess_image_bytes(const uint8_t* bytes, int bits, int height, int width, int in_channels,
                            const ImageLoadOptions& opt, float* out) {
  LANCET_CHECK(bits == 8 || bits == 16, "preprocess_image: depth must be 8 or 16 bits, got " << bits);
  LANCET_CHECK(in_channels == 1 || in_channels == 3, "preprocess_image: in_channels must be 1 or 3");
  preprocess_mat(cv::Mat(height, width, bits == 8 ? CV_8UC(in_channels) : CV_16UC(in_channels),
                         const_cast<uint8_t*>(bytes)),
                 opt, out);
}

DecodedImage widen_to_16_bits(DecodedImage img) {
  if (img.bits == 16) return img;
  cv::Mat m;
  image_mat(img).convertTo(m, CV_16U, 257.0);
  return from_mat(m);
}

namespace {

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

// One CSV record: comma-separated, fields optionally double-quoted ("" escapes a quote).
std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char ch = line[i];
    if (quoted) {
      if (ch == '"' && i + 1 < line.size() && line[i + 1] == '"') out.back() += '"', ++i;
      else if (ch == '"') quoted = false;
      else out.back() += ch;
    } else if (ch == '"') {
      quoted = true;
    } else if (ch == ',') {
      out.emplace_back();
    } else {
      out.back() += ch;
    }
  }
  for (auto& f : out) f = trim(f);
  return out;
}

bool is_index(const std::string& s) {
  return !s.empty() && s.size() < 10 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// "1, 2, 3" for the indices in `v`.
std::string index_list_text(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

// The rows of <dir>/manifest.csv, checked: a header naming path and label (and split), every
// row with as many columns and a path and a label.
struct Manifest {
  struct Row {
    std::string path, label, split;  // split "" when the manifest has no split column
    int line;
  };
  std::string file;
  bool has_split = false;
  std::vector<Row> rows;
};

Manifest read_manifest_rows(const fs::path& dir) {
  Manifest m;
  m.file = (dir / "manifest.csv").string();
  const std::string& mpath = m.file;
  std::ifstream in(mpath);
  LANCET_CHECK(in, mpath << ": cannot read: " << std::strerror(errno));
  std::string line;
  LANCET_CHECK(std::getline(in, line), mpath << ": empty manifest (expected a header row path,label[,split])");
  // Excel's "CSV UTF-8" starts the file with a byte-order mark, which would hide the first name.
  if (line.compare(0, 3, "\xEF\xBB\xBF") == 0) line.erase(0, 3);
  const std::vector<std::string> header = split_csv(line);
  int ip = -1, il = -1, is = -1;
  for (size_t i = 0; i < header.size(); ++i) {
    std::string h = header[i];
    std::transform(h.begin(), h.end(), h.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (h == "path") ip = static_cast<int>(i);
    if (h == "label") il = static_cast<int>(i);
    if (h == "split") is = static_cast<int>(i);
  }
  LANCET_CHECK(ip >= 0 && il >= 0, mpath << ":1: the header must name the columns path,label[,split], got '"
                                         << trim(line) << "'");
  m.has_split = is >= 0;
  const size_t need = static_cast<size_t>(std::max({ip, il, is})) + 1;
  for (int ln = 2; std::getline(in, line); ++ln) {
    if (trim(line).empty()) continue;
    const std::vector<std::string> f = split_csv(line);
    LANCET_CHECK(f.size() >= need, mpath << ":" << ln << ": expected " << need << " columns, got " << f.size());
    LANCET_CHECK(!f[ip].empty() && !f[il].empty(), mpath << ":" << ln << ": empty path or label");
    m.rows.push_back({f[ip], f[il], is >= 0 ? f[is] : std::string(), ln});
  }
  return m;
}

// The distinct values of the manifest's split column, sorted.
std::vector<std::string> split_values(const Manifest& m) {
  std::set<std::string> s;
  for (const auto& r : m.rows) s.insert(r.split);
  return {s.begin(), s.end()};
}

std::vector<ImageItem> read_manifest(const fs::path& dir, const std::string& split, std::vector<std::string>* classes,
                                     const std::vector<std::string>& declared) {
  const Manifest m = read_manifest_rows(dir);
  const std::string& mpath = m.file;
  LANCET_CHECK(split.empty() || m.has_split, mpath << ": no split column, so split '" << split
                                                   << "' cannot be selected: add a split column (path,label,split), "
                                                      "or select every row with an empty split name");
  using Row = Manifest::Row;
  const std::vector<Row>& rows = m.rows;
  // The class list comes from every row, so that all splits of one manifest agree on it.
  // Declared names win over indices: labels are indices only when they are not all names.
  const auto declared_index = [&](const std::string& label) {
    return std::find(declared.begin(), declared.end(), label) - declared.begin();
  };
  const bool named = !declared.empty() && std::all_of(rows.begin(), rows.end(), [&](const Row& r) {
    return declared_index(r.label) < static_cast<std::ptrdiff_t>(declared.size());
  });
  const bool numeric = !named && std::all_of(rows.begin(), rows.end(), [](const Row& r) { return is_index(r.label); });
  classes->clear();
  if (!declared.empty()) {
    const int64_t k = static_cast<int64_t>(declared.size());
    for (const Row& r : rows) {
      if (named || (numeric ? std::stoll(r.label) < k : declared_index(r.label) < k)) continue;
      LANCET_FAIL(mpath << ":" << r.line << ": label '" << r.label << "' is not one of the classes "
                        << class_list_text(declared)
                        << (numeric ? " (integer labels are class indices 0-" + std::to_string(k - 1) + ")" : ""));
    }
    *classes = declared;
  } else if (numeric) {
    std::set<int64_t> seen;
    for (const Row& r : rows) seen.insert(std::stoll(r.label));
    const int64_t max_label = seen.empty() ? -1 : *seen.rbegin();
    std::vector<int64_t> missing;
    for (int64_t k = 0; k <= max_label && missing.size() < 10; ++k)
      if (!seen.count(k)) missing.push_back(k);
    // Counted, not listed, when there are many (labels {0, 999999999}).
    const int64_t n_missing = max_label + 1 - static_cast<int64_t>(seen.size());
    LANCET_CHECK(n_missing == 0,
                 mpath << ": integer labels are class indices 0-" << max_label << ", but " << n_missing
                       << " of them have no row (" << index_list_text(missing) << (n_missing > 10 ? ", ..." : "")
                       << "): a class without images is a model output that never trains; relabel 0-"
                       << seen.size() - 1 << ", or declare every class in data.classes");
    for (int64_t k = 0; k <= max_label; ++k) classes->push_back(std::to_string(k));
  } else {
    const std::set<std::string> names = [&] {
      std::set<std::string> s;
      for (const Row& r : rows) s.insert(r.label);
      return s;
    }();
    classes->assign(names.begin(), names.end());
  }
  std::vector<ImageItem> items;
  for (const Row& r : rows) {
    if (!split.empty() && r.split != split) continue;
    const int64_t label = named     ? declared_index(r.label)
                          : numeric ? std::stoll(r.label)
                                    : std::lower_bound(classes->begin(), classes->end(), r.label) - classes->begin();
    const fs::path p(r.path);
    items.push_back({(p.is_absolute() ? p : dir / p).string(), label});
  }
  LANCET_CHECK(!items.empty(), mpath << ": no rows" << (split.empty() ? "" : " with split '" + split + "'")
                                     << (split.empty() ? "" : " (its split column has " +
                                                                  class_list_text(split_values(m)) + ")"));
  return items;
}

bool is_image_file(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp" || ext == ".tif" || ext == ".tiff" ||
         is_dicom_path(p.string());
}

std::vector<ImageItem> read_folders(const fs::path& dir, const std::string& split, std::vector<std::string>* classes,
                                    const std::vector<std::string>& declared) {
  const fs::path root = split.empty() ? dir : dir / split;
  LANCET_CHECK(fs::is_directory(root), dir.string() << ": no manifest.csv and no '" << split << "' folder");
  std::vector<std::string> folders;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && !name.empty() && name[0] != '.') folders.push_back(name);
  }
  std::sort(folders.begin(), folders.end());
  LANCET_CHECK(!folders.empty(), root.string() << ": no manifest.csv and no class sub-folders");
  for (const auto& name : folders)
    LANCET_CHECK(declared.empty() || std::find(declared.begin(), declared.end(), name) != declared.end(),
                 root.string() << ": class folder '" << name << "' is not one of data.classes "
                               << class_list_text(declared));
  *classes = declared.empty() ? folders : declared;
  std::vector<ImageItem> items;
  for (size_t k = 0; k < classes->size(); ++k) {
    const fs::path cdir = root / (*classes)[k];
    if (!std::binary_search(folders.begin(), folders.end(), (*classes)[k])) continue;  // declared, no folder
    std::vector<std::string> files, subfolders;
    for (const auto& e : fs::directory_iterator(cdir)) {
      if (e.is_regular_file() && is_image_file(e.path())) files.push_back(e.path().string());
      if (e.is_directory()) subfolders.push_back(e.path().filename().string());
    }
    // <dir>/<split>/<class>/ read without a split: the split folders look like empty classes.
    std::sort(subfolders.begin(), subfolders.end());
    LANCET_CHECK(!files.empty() || subfolders.empty() || !split.empty(),
                 cdir.string() << ": no images, only the sub-folders " << class_list_text(subfolders)
                               << ": if '" << (*classes)[k] << "' is a split of " << dir.string()
                               << ", select it (data.train_split, data.val_split, lancet eval --split)");
    LANCET_CHECK(!files.empty(), cdir.string() << ": empty class folder (no .png/.jpg/.jpeg/.bmp/.tif/.tiff/.dcm/.dicom images)");
    std::sort(files.begin(), files.end());
    for (auto& f : files) items.push_back({std::move(f), static_cast<int64_t>(k)});
  }
  return items;
}

// True when a JPEG stream reaches its end-of-image marker (FF D9). libjpeg decodes a
// truncated file without an error (it warns and fills the missing rows with grey), so
// decode_image_file refuses such files itself. Walks the marker segments, each skipped by its
// length (an EXIF thumbnail's own EOI inside APP1 does not count), and the entropy-coded data
// after each SOS, where FF is followed only by 00 (a stuffed byte) or an RSTn marker, up to
// EOI. Whatever follows EOI (zero padding, vendor trailers) is ignored.
bool jpeg_has_eoi(const std::vector<uint8_t>& b) {
  const size_t n = b.size();
  size_t i = 2;  // after SOI
  while (i + 1 < n) {
    if (b[i] != 0xFF || b[i + 1] == 0xFF) {  // junk before a marker, or fill bytes: libjpeg skips them too
      ++i;
      continue;
    }
    const uint8_t m = b[i + 1];
    if (m == 0xD9) return true;
    if (m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD8)) {  // markers without a length
      i += 2;
      continue;
    }
    if (i + 3 >= n) return false;
    i += 2 + ((static_cast<size_t>(b[i + 2]) << 8) | b[i + 3]);
    if (m == 0xDA)  // start of scan: entropy-coded data up to the next real marker
      while (i + 1 < n && !(b[i] == 0xFF && b[i + 1] != 0x00 && (b[i + 1] < 0xD0 || b[i + 1] > 0xD7))) ++i;
  }
  return false;
}

}  // namespace

DecodedImage decode_image_file(const std::string& file, const ImageLoadOptions& opt) {
  std::error_code ec;
  LANCET_CHECK(!fs::is_directory(file, ec), file << ": a directory, not an image file");
  cv::Mat img;
  DicomPixels px;  // a DICOM's pixels, which img views
  if (is_dicom_path(file)) {
    DicomOptions dopt;
    if (!opt.dicom_window.empty()) dopt.window = DicomWindow{opt.dicom_window[0], opt.dicom_window[1]};
    dopt.bits = opt.bit_depth;
    px = read_dicom(file, dopt);
    img = px.bits == 8 ? cv::Mat(px.rows, px.cols, CV_8UC(px.channels), px.u8.data())
                       : cv::Mat(px.rows, px.cols, CV_16UC(px.channels), px.u16.data());
    // Colour DICOMs go through the recipe at 8 bits, as other colour images (v / 257 is exact
    // for 8-bit samples, and rounds 16-bit ones as an 8-bit read does).
    if (img.depth() == CV_16U && img.channels() == 3) img.convertTo(img, CV_8U, 1.0 / 257.0);
  } else {
    std::ifstream in(file, std::ios::binary);
    LANCET_CHECK(in, file << ": cannot read: " << std::strerror(errno));
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    LANCET_CHECK(!bytes.empty(), file << ": empty file");
    const bool jpeg = bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF;
    LANCET_CHECK(!jpeg || jpeg_has_eoi(bytes), file << ": truncated JPEG (no end-of-image marker)");
    // DICOM files are told by their name (exported series often have none: IM0001, or UIDs).
    const bool dicom = bytes.size() >= 132 && std::memcmp(bytes.data() + 128, "DICM", 4) == 0;
    LANCET_CHECK(!dicom, file << ": a DICOM file without the .dcm or .dicom extension that DICOM files are read by "
                                 "(rename it, or its manifest path)");
    try {
      img = cv::imdecode(bytes, cv::IMREAD_ANYDEPTH | cv::IMREAD_ANYCOLOR);
    } catch (const cv::Exception& e) {
      LANCET_FAIL(file << ": cannot decode image: " << e.err);
    }
    LANCET_CHECK(!img.empty(), file << ": cannot decode image (corrupt or unsupported format)");
    LANCET_CHECK(img.depth() == CV_8U || img.depth() == CV_16U,
                 file << ": unsupported pixel depth (expected 8- or 16-bit integers)");
    switch (img.channels()) {  // OpenCV decodes colour as BGR(A); preprocess_image wants RGB
      case 1: break;
      case 2: cv::extractChannel(img, img, 0); break;
      case 3: cv::cvtColor(img, img, cv::COLOR_BGR2RGB); break;
      case 4: cv::cvtColor(img, img, cv::COLOR_BGRA2RGB); break;
      default: LANCET_FAIL(file << ": unsupported channel count " << img.channels());
    }
  }
  // The recipe sees the decoded depth (16-bit ops use the full range); then to opt.bit_depth.
  if (opt.recipe && !opt.recipe->empty()) {
    try {
      opt.recipe->apply(img);
    } catch (const Error& e) {
      LANCET_FAIL(file << ": " << e.what());
    }
  }
  if (opt.bit_depth == 8 && img.depth() == CV_16U) img.convertTo(img, CV_8U, 1.0 / 257.0);
  if (opt.bit_depth == 16 && img.depth() == CV_8U) img.convertTo(img, CV_16U, 257.0);
  return from_mat(img);
}

std::vector<std::string> manifest_splits(const std::string& dir) {
  const Manifest m = read_manifest_rows(dir);
  return m.has_split ? split_values(m) : std::vector<std::string>{};
}

std::vector<ImageItem> list_images(const std::string& dir, const std::string& split, std::vector<std::string>* classes,
                                   const std::vector<std::string>& declared) {
  LANCET_CHECK(fs::is_directory(dir), dir << ": no such directory");
  return fs::exists(fs::path(dir) / "manifest.csv") ? read_manifest(dir, split, classes, declared)
                                                    : read_folders(dir, split, classes, declared);
}

std::vector<uint8_t> resize_image(const uint8_t* pixels, int height, int width, int in_channels, int channels,
                                  int size) {
  LANCET_CHECK(in_channels == 1 || in_channels == 3, "resize_image: channels must be 1 or 3");
  return resize_mat(cv::Mat(height, width, CV_8UC(in_channels), const_cast<uint8_t*>(pixels)), channels, size);
}

std::vector<uint8_t> resize_image(const DecodedImage& img, int channels, int size) {
  return resize_mat(image_mat(img), channels, size);
}

std::vector<uint8_t> resize_image(const DecodedImage& img, const ImageLoadOptions& opt) {
  LANCET_CHECK(img.bits == opt.bit_depth, "a " << img.bits << "-bit image where data.bit_depth is " << opt.bit_depth);
  return resize_image(img, opt.channels, opt.image_size);
}

size_t image_bytes(int64_t rows, int64_t cols, int channels, int bits) {
  return static_cast<size_t>(rows) * static_cast<size_t>(cols) * static_cast<size_t>(channels) *
         static_cast<size_t>(bits / 8);
}

std::unique_ptr<InMemoryDataset> load_image_dataset(const std::string& dir, const std::string& split,
                                                    const ImageLoadOptions& opt) {
  check_load_options(opt);
  std::vector<std::string> classes;
  const std::vector<ImageItem> items = list_images(dir, split, &classes, opt.classes);
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t s = opt.image_size;
  Tensor images = Tensor::empty({n, opt.channels, s, s});
  float* base = images.data<float>();
  const int64_t per = opt.channels * s * s;
  // One decode per item across lancet's worker threads; OpenCV's own threads would
  // oversubscribe the cores, so it runs single-threaded inside each task.
  cv::setNumThreads(0);
  std::mutex mu;
  int64_t first_bad = n;
  std::string first_error;
  parallel_for(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      try {
        const DecodedImage img = decode_image_file(items[static_cast<size_t>(i)].file, opt);
        preprocess_image_bytes(img.pixels.data(), img.bits, img.rows, img.cols, img.channels, opt, base + i * per);
      } catch (const std::exception& e) {  // exceptions must not escape an OpenMP region
        std::lock_guard<std::mutex> lock(mu);
        if (i < first_bad) first_bad = i, first_error = e.what();
      }
    }
  });
  if (first_bad < n) throw Error(first_error);  // the same error whatever the thread count
  std::vector<int64_t> labels;
  labels.reserve(items.size());
  for (const ImageItem& it : items) labels.push_back(it.label);
  return std::make_unique<InMemoryDataset>(std::move(images), std::move(labels), std::move(classes));
}

}  // namespace lancet
