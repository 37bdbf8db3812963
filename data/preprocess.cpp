#include "data/preprocess.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include "kernels/error.h"

namespace lancet {

using Kind = PreprocessOp::Kind;

namespace {

// The version of an op's output: bump it when the output changes for the same parameters, so
// that caches keyed by the fingerprint of the recipes using it (packs) go stale while the
// others stay valid. A recipe's version is the highest of its ops' (1 when empty).
int op_version(const PreprocessOp& op) {
  // 2: pad_value became an 8-bit level at every depth (16-bit images were padded with the raw
  // value, so 255 was black there).
  if (op.kind == Kind::resize && op.keep_aspect && op.pad_value != 0) return 2;
  // 2: CLAHE on 16-bit gray images has the 8-bit operator's meaning (clahe16; cv::CLAHE at 16
  // bits left most images nearly unchanged). 8-bit output is unchanged, but a pack cannot tell
  // which depth its images went through the recipe at.
  if (op.kind == Kind::clahe) return 2;
  return 1;
}

constexpr Kind kKinds[] = {Kind::resize,        Kind::clahe,
                           Kind::gamma,         Kind::median_blur,
                           Kind::gaussian_blur, Kind::contrast_normalize,
                           Kind::to_gray,       Kind::to_rgb};

// The keys each op accepts besides "op", in the order to_json writes them.
std::vector<std::string> op_keys(Kind k) {
  switch (k) {
    case Kind::resize: return {"size", "keep_aspect", "pad_value"};
    case Kind::clahe: return {"clip_limit", "tile_grid"};
    case Kind::gamma: return {"gamma"};
    case Kind::median_blur: return {"ksize"};
    case Kind::gaussian_blur: return {"ksize", "sigma"};
    case Kind::contrast_normalize: return {"percentiles"};
    case Kind::to_gray:
    case Kind::to_rgb: return {};
  }
  return {};
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Typed reads of one op object's parameters; errors name `where.key`.
class OpFields {
 public:
  OpFields(const Json& obj, std::string where) : obj_(obj), where_(std::move(where)) {}

  // `note` follows the range in the error (what the value means).
  int integer(const char* key, int def, int lo, int hi, bool required = false, const char* note = "") const {
    const Json* v = find(key);
    if (!v) {
      LANCET_CHECK(!required, where_ << "." << key << ": required (an integer in [" << lo << ", " << hi << "])");
      return def;
    }
    bool ok = false;
    int64_t x = 0;
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      ok = u <= static_cast<uint64_t>(hi);
      x = static_cast<int64_t>(ok ? u : 0);
    } else if (v->is_number_integer()) {
      x = v->get<int64_t>();
      ok = true;
    }
    LANCET_CHECK(ok && x >= lo && x <= hi,
                 where_ << "." << key << ": expected an integer in [" << lo << ", " << hi << "]" << note << ", got "
                        << v->dump());
    return static_cast<int>(x);
  }

  int odd_ksize(const char* key, int def) const {
    const int k = integer(key, def, 3, 255);
    LANCET_CHECK(k % 2 == 1, where_ << "." << key << ": expected an odd integer in [3, 255], got " << k);
    return k;
  }

  // A finite number > lo (lo_open) or >= lo.
  double number(const char* key, double def, double lo, bool lo_open) const {
    const Json* v = find(key);
    if (!v) return def;
    const bool ok = v->is_number() && std::isfinite(v->get<double>()) &&
                    (lo_open ? v->get<double>() > lo : v->get<double>() >= lo);
    LANCET_CHECK(ok, where_ << "." << key << ": expected a number " << (lo_open ? "> " : ">= ") << lo << ", got "
                            << v->dump());
    return v->get<double>();
  }

  bool boolean(const char* key, bool def) const {
    const Json* v = find(key);
    if (!v) return def;
    LANCET_CHECK(v->is_boolean(), where_ << "." << key << ": expected true or false, got " << v->dump());
    return v->get<bool>();
  }

  // [low, high] with 0 <= low < high <= 100.
  void percentiles(const char* key, double* low, double* high) const {
    const Json* v = find(key);
    if (!v) return;
    const bool ok = v->is_array() && v->size() == 2 && (*v)[0].is_number() && (*v)[1].is_number() &&
                    (*v)[0].get<double>() >= 0 && (*v)[0].get<double>() < (*v)[1].get<double>() &&
                    (*v)[1].get<double>() <= 100;
    LANCET_CHECK(ok, where_ << "." << key << ": expected [low, high] with 0 <= low < high <= 100, got " << v->dump());
    *low = (*v)[0].get<double>();
    *high = (*v)[1].get<double>();
  }

 private:
  const Json* find(const char* key) const {
    const auto it = obj_.find(key);
    return it == obj_.end() ? nullptr : &*it;
  }
  const Json& obj_;
  std::string where_;
};

// "; YAML reads 'op:clahe' as one key: ..." when a key holds a colon and no value ({op:clahe},
// written without the space YAML needs after a colon), else "".
std::string glued_key_hint(const Json& obj) {
  for (auto it = obj.begin(); it != obj.end(); ++it)
    if (it.key().find(':') != std::string::npos && it->is_null())
      return "; YAML reads '" + it.key() + "' as one key: write a space after the colon";
  return "";
}

PreprocessOp parse_op(const Json& obj, const std::string& where) {
  LANCET_CHECK(obj.is_object(), where << ": expected an object with an \"op\" key, got " << obj.dump());
  const auto op_it = obj.find("op");
  LANCET_CHECK(op_it != obj.end(), where << ".op: missing (each op is an object like {\"op\": \"resize\", ...})"
                                         << glued_key_hint(obj));
  std::vector<std::string> names;
  for (Kind k : kKinds) names.emplace_back(preprocess_op_name(k));
  const std::string name = op_it->is_string() ? op_it->get<std::string>() : op_it->dump();
  const auto name_it = std::find(names.begin(), names.end(), name);
  LANCET_CHECK(op_it->is_string() && name_it != names.end(),
               where << ".op: unknown op '" << name << "' (valid: " << join(names) << ")");

  PreprocessOp op;
  op.kind = kKinds[name_it - names.begin()];
  const std::vector<std::string> keys = op_keys(op.kind);
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    if (it.key() == "op") continue;
    LANCET_CHECK(std::find(keys.begin(), keys.end(), it.key()) != keys.end(),
                 where << "." << it.key() << ": unknown key for " << name
                       << (keys.empty() ? " (it takes no parameters)" : " (valid: " + join(keys) + ")")
                       << glued_key_hint(obj));
  }

  const OpFields f(obj, where);
  switch (op.kind) {
    case Kind::resize:
      op.size = f.integer("size", 0, 1, 65536, /*required=*/true);
      op.keep_aspect = f.boolean("keep_aspect", false);
      op.pad_value = f.integer("pad_value", 0, 0, 255, /*required=*/false,
                               " (an 8-bit level at every depth: 16-bit images are padded with pad_value * 257)");
      break;
    case Kind::clahe:
      op.clip_limit = f.number("clip_limit", 2.0, 0.0, /*lo_open=*/true);
      op.tile_grid = f.integer("tile_grid", 8, 1, 256);
      break;
    case Kind::gamma: op.gamma = f.number("gamma", 1.0, 0.0, /*lo_open=*/true); break;
    case Kind::median_blur: op.ksize = f.odd_ksize("ksize", 3); break;
    case Kind::gaussian_blur:
      op.ksize = f.odd_ksize("ksize", 5);
      op.sigma = f.number("sigma", 0.0, 0.0, /*lo_open=*/false);
      break;
    case Kind::contrast_normalize: f.percentiles("percentiles", &op.low_percentile, &op.high_percentile); break;
    case Kind::to_gray:
    case Kind::to_rgb: break;
  }
  return op;
}

Json op_to_json(const PreprocessOp& op) {
  Json j = {{"op", preprocess_op_name(op.kind)}};
  switch (op.kind) {
    case Kind::resize:
      j["size"] = op.size;
      j["keep_aspect"] = op.keep_aspect;
      j["pad_value"] = op.pad_value;
      break;
    case Kind::clahe:
      j["clip_limit"] = op.clip_limit;
      j["tile_grid"] = op.tile_grid;
      break;
    case Kind::gamma: j["gamma"] = op.gamma; break;
    case Kind::median_blur: j["ksize"] = op.ksize; break;
    case Kind::gaussian_blur:
      j["ksize"] = op.ksize;
      j["sigma"] = op.sigma;
      break;
    case Kind::contrast_normalize: j["percentiles"] = {op.low_percentile, op.high_percentile}; break;
    case Kind::to_gray:
    case Kind::to_rgb: break;
  }
  return j;
}

// ---- the ops: each reads `in` and writes a new `out` (or shares `in` when there is nothing
// to do) ----

void resize_op(const PreprocessOp& op, const cv::Mat& in, cv::Mat& out) {
  const int s = op.size, w = in.cols, h = in.rows;
  // The same grey at either depth (v * 257 is exact), so one recipe pads 8-bit files, 16-bit
  // files and DICOMs (windowed to 8 or 16 bits by data.bit_depth) alike.
  const int pad = in.depth() == CV_8U ? op.pad_value : op.pad_value * 257;
  int nw = s, nh = s;
  if (op.keep_aspect) {
    if (w >= h) nh = std::max(1, static_cast<int>(std::lround(static_cast<double>(h) * s / w)));
    else nw = std::max(1, static_cast<int>(std::lround(static_cast<double>(w) * s / h)));
  }
  cv::Mat scaled;
  if (nw == w && nh == h) {
    scaled = in;
  } else {
    const int interp = nw <= w && nh <= h ? cv::INTER_AREA : cv::INTER_LINEAR;
    cv::resize(in, scaled, cv::Size(nw, nh), 0, 0, interp);
  }
  if (nw == s && nh == s) {
    out = scaled;
    return;
  }
  const int top = (s - nh) / 2, left = (s - nw) / 2;
  cv::copyMakeBorder(scaled, out, top, s - nh - top, left, s - nw - left, cv::BORDER_CONSTANT,
                     cv::Scalar::all(pad));
}

// CLAHE on a 16-bit gray image with the meaning it has at 8 bits (preprocess.h). cv::CLAHE
// at 16 bits histograms 65536 levels and scales the clip limit by that count, which leaves
// most images nearly unchanged; here, as cv::CLAHE does at 8 bits: tiles (the image extended
// by BORDER_REFLECT_101 when the grid does not divide it), a histogram of each tile over the
// 256 8-bit levels (v / 257 rounded), clipped at max(1, int(clip_limit * tile pixels / 256))
// with the excess spread evenly and its remainder one count at a time (every
// max(1, 256 / remainder)-th level), and the cumulative count times 255 / tile pixels as the
// tile's curve; each pixel bilinearly between its four nearest tiles' curves. Where the 8-bit
// operator rounds the curve to whole levels and reads it at one level per pixel, this keeps it
// unrounded and reads it between levels (v / 257 interpolated), so the detail within an 8-bit
// level survives; on widened 8-bit content (v * 257) the result is the 8-bit operator's to
// within one 8-bit level.
cv::Mat clahe16(const cv::Mat& in, double clip_limit, int grid) {
  constexpr int kLevels = 256;
  cv::Mat src = in;
  if (in.cols % grid != 0 || in.rows % grid != 0)  // as cv::CLAHE extends (a whole extra tile row when divisible)
    cv::copyMakeBorder(in, src, 0, grid - in.rows % grid, 0, grid - in.cols % grid, cv::BORDER_REFLECT_101);
  const int tw = src.cols / grid, th = src.rows / grid, total = tw * th;
  // A clip at or above the tile's pixel count clips nothing (and a huge clip_limit must not
  // overflow the int).
  const double clip_at = clip_limit * total / kLevels;
  const int clip = clip_at >= total ? total : std::max(1, static_cast<int>(clip_at));
  const auto level = [](uint16_t v) { return static_cast<int>((2u * v + 257u) / 514u); };  // round(v / 257)
  std::vector<float> curves(static_cast<size_t>(grid) * grid * kLevels);
  std::vector<int> hist(kLevels);
  for (int ty = 0; ty < grid; ++ty)
    for (int tx = 0; tx < grid; ++tx) {
      std::fill(hist.begin(), hist.end(), 0);
      for (int y = ty * th; y < (ty + 1) * th; ++y) {
        const uint16_t* row = src.ptr<uint16_t>(y) + tx * tw;
        for (int x = 0; x < tw; ++x) ++hist[static_cast<size_t>(level(row[x]))];
      }
      int clipped = 0;
      for (int& h : hist)
        if (h > clip) clipped += h - clip, h = clip;
      const int batch = clipped / kLevels;
      int residual = clipped - batch * kLevels;
      for (int& h : hist) h += batch;
      if (residual > 0) {
        const int step = std::max(kLevels / residual, 1);
        for (int i = 0; i < kLevels && residual > 0; i += step, --residual) ++hist[static_cast<size_t>(i)];
      }
      float* curve = curves.data() + (static_cast<size_t>(ty) * grid + tx) * kLevels;
      const float scale = static_cast<float>(kLevels - 1) / static_cast<float>(total);
      int sum = 0;
      for (int i = 0; i < kLevels; ++i) sum += hist[static_cast<size_t>(i)], curve[i] = static_cast<float>(sum) * scale;
    }
  // A pixel's value on one tile's curve, in 8-bit units, between the levels around v / 257.
  const auto on_curve = [](const float* curve, int i0, float frac) {
    return i0 >= kLevels - 1 ? curve[kLevels - 1] : curve[i0] + (curve[i0 + 1] - curve[i0]) * frac;
  };
  cv::Mat out(in.size(), CV_16UC1);
  const float inv_tw = 1.0f / static_cast<float>(tw), inv_th = 1.0f / static_cast<float>(th);
  std::vector<int> tx1(static_cast<size_t>(in.cols)), tx2(static_cast<size_t>(in.cols));
  std::vector<float> xa(static_cast<size_t>(in.cols));
  for (int x = 0; x < in.cols; ++x) {
    const float txf = static_cast<float>(x) * inv_tw - 0.5f;
    const int t = static_cast<int>(std::floor(txf));
    xa[static_cast<size_t>(x)] = txf - static_cast<float>(t);
    tx1[static_cast<size_t>(x)] = std::max(t, 0), tx2[static_cast<size_t>(x)] = std::min(t + 1, grid - 1);
  }
  for (int y = 0; y < in.rows; ++y) {
    const float tyf = static_cast<float>(y) * inv_th - 0.5f;
    const int t = static_cast<int>(std::floor(tyf));
    const float ya = tyf - static_cast<float>(t);
    const float* row1 = curves.data() + static_cast<size_t>(std::max(t, 0)) * grid * kLevels;
    const float* row2 = curves.data() + static_cast<size_t>(std::min(t + 1, grid - 1)) * grid * kLevels;
    const uint16_t* s = in.ptr<uint16_t>(y);
    uint16_t* d = out.ptr<uint16_t>(y);
    for (int x = 0; x < in.cols; ++x) {
      const float v = static_cast<float>(s[x]) / 257.0f;
      const int i0 = static_cast<int>(v);
      const float frac = v - static_cast<float>(i0);
      const size_t a = static_cast<size_t>(tx1[static_cast<size_t>(x)]) * kLevels,
                   b = static_cast<size_t>(tx2[static_cast<size_t>(x)]) * kLevels;
      const float w = xa[static_cast<size_t>(x)];
      const float top = on_curve(row1 + a, i0, frac) * (1 - w) + on_curve(row1 + b, i0, frac) * w;
      const float bottom = on_curve(row2 + a, i0, frac) * (1 - w) + on_curve(row2 + b, i0, frac) * w;
      d[x] = cv::saturate_cast<uint16_t>((top * (1 - ya) + bottom * ya) * 257.0f);
    }
  }
  return out;
}

void clahe_op(const PreprocessOp& op, const cv::Mat& in, cv::Mat& out, const std::string& at) {
  if (in.channels() == 1 && in.depth() == CV_16U) {
    out = clahe16(in, op.clip_limit, op.tile_grid);
    return;
  }
  // A CLAHE object keeps scratch buffers between apply() calls: one per call keeps
  // concurrent applications independent.
  const cv::Ptr<cv::CLAHE> clahe = cv::createCLAHE(op.clip_limit, cv::Size(op.tile_grid, op.tile_grid));
  if (in.channels() == 1) {
    clahe->apply(in, out);
    return;
  }
  LANCET_CHECK(in.depth() == CV_8U, at << ": 16-bit RGB images are not supported (convert to_gray first)");
  cv::Mat lab, l;
  cv::cvtColor(in, lab, cv::COLOR_RGB2Lab);
  std::vector<cv::Mat> planes;
  cv::split(lab, planes);
  clahe->apply(planes[0], l);
  planes[0] = l;
  cv::merge(planes, lab);
  cv::cvtColor(lab, out, cv::COLOR_Lab2RGB);
}

void gamma_op(const std::vector<uint8_t>& lut8, const std::vector<uint16_t>& lut16, const cv::Mat& in,
              cv::Mat& out) {
  if (in.depth() == CV_8U) {
    const cv::Mat lut(1, 256, CV_8U, const_cast<uint8_t*>(lut8.data()));  // read only
    cv::LUT(in, lut, out);
    return;
  }
  out.create(in.size(), in.type());
  const int n = in.cols * in.channels();
  for (int r = 0; r < in.rows; ++r) {
    const uint16_t* src = in.ptr<uint16_t>(r);
    uint16_t* dst = out.ptr<uint16_t>(r);
    for (int c = 0; c < n; ++c) dst[c] = lut16[src[c]];
  }
}

// The values at ranks round(p / 100 * (N - 1)) of the image's N channel values.
template <typename T>
void percentile_values(const cv::Mat& in, double low_p, double high_p, double* low, double* high) {
  std::vector<int64_t> hist(size_t{1} << (8 * sizeof(T)), 0);
  const int n = in.cols * in.channels();
  for (int r = 0; r < in.rows; ++r) {
    const T* p = in.ptr<T>(r);
    for (int c = 0; c < n; ++c) ++hist[p[c]];
  }
  const int64_t count = static_cast<int64_t>(in.total()) * in.channels();
  const int64_t rank_low = std::llround(low_p / 100.0 * static_cast<double>(count - 1));
  const int64_t rank_high = std::llround(high_p / 100.0 * static_cast<double>(count - 1));
  int64_t seen = 0;
  bool have_low = false;
  for (size_t v = 0; v < hist.size(); ++v) {
    seen += hist[v];
    if (!have_low && seen > rank_low) {
      *low = static_cast<double>(v);
      have_low = true;
    }
    if (seen > rank_high) {
      *high = static_cast<double>(v);
      return;
    }
  }
}

void contrast_op(const PreprocessOp& op, const cv::Mat& in, cv::Mat& out) {
  double lo = 0, hi = 0;
  if (in.depth() == CV_8U) percentile_values<uint8_t>(in, op.low_percentile, op.high_percentile, &lo, &hi);
  else percentile_values<uint16_t>(in, op.low_percentile, op.high_percentile, &lo, &hi);
  if (hi <= lo) {
    out = in;
    return;
  }
  // The same arithmetic as cv::normalize(NORM_MINMAX), so [0, 100] matches it bit for bit.
  const double max_value = in.depth() == CV_8U ? 255.0 : 65535.0;
  const double scale = max_value * (1.0 / (hi - lo));
  const double shift = 0.0 - lo * scale;
  in.convertTo(out, -1, scale, shift);
}

void run_op(const PreprocessOp& op, const std::vector<uint8_t>& lut8, const std::vector<uint16_t>& lut16,
            const cv::Mat& in, cv::Mat& out, const std::string& at) {
  switch (op.kind) {
    case Kind::resize: resize_op(op, in, out); break;
    case Kind::clahe: clahe_op(op, in, out, at); break;
    case Kind::gamma: gamma_op(lut8, lut16, in, out); break;
    case Kind::median_blur:
      LANCET_CHECK(in.depth() == CV_8U || op.ksize <= 5,
                   at << ": ksize " << op.ksize << " is not supported on 16-bit images (3 or 5)");
      cv::medianBlur(in, out, op.ksize);
      break;
    case Kind::gaussian_blur:
      cv::GaussianBlur(in, out, cv::Size(op.ksize, op.ksize), op.sigma, op.sigma, cv::BORDER_DEFAULT);
      break;
    case Kind::contrast_normalize: contrast_op(op, in, out); break;
    case Kind::to_gray:
      if (in.channels() == 3) cv::cvtColor(in, out, cv::COLOR_RGB2GRAY);
      else out = in;
      break;
    case Kind::to_rgb:
      if (in.channels() == 1) cv::cvtColor(in, out, cv::COLOR_GRAY2RGB);
      else out = in;
      break;
  }
}

}  // namespace

const char* preprocess_op_name(Kind kind) {
  switch (kind) {
    case Kind::resize: return "resize";
    case Kind::clahe: return "clahe";
    case Kind::gamma: return "gamma";
    case Kind::median_blur: return "median_blur";
    case Kind::gaussian_blur: return "gaussian_blur";
    case Kind::contrast_normalize: return "contrast_normalize";
    case Kind::to_gray: return "to_gray";
    case Kind::to_rgb: return "to_rgb";
  }
  return "?";
}

PreprocessRecipe PreprocessRecipe::from_json(const Json& ops, const std::string& where) {
  LANCET_CHECK(ops.is_array(), where << ": expected a list of ops like [{\"op\": \"clahe\"}], got " << ops.dump());
  PreprocessRecipe r;
  r.where_ = where;
  for (size_t i = 0; i < ops.size(); ++i) {
    const PreprocessOp op = parse_op(ops[i], where + "[" + std::to_string(i) + "]");
    std::vector<uint8_t> lut8;
    std::vector<uint16_t> lut16;
    if (op.kind == Kind::gamma) {
      lut8.resize(256);
      for (int v = 0; v < 256; ++v) lut8[v] = cv::saturate_cast<uint8_t>(std::pow(v / 255.0, op.gamma) * 255.0);
      lut16.resize(65536);
      for (int v = 0; v < 65536; ++v)
        lut16[v] = cv::saturate_cast<uint16_t>(std::pow(v / 65535.0, op.gamma) * 65535.0);
    }
    r.ops_.push_back(op);
    r.lut8_.push_back(std::move(lut8));
    r.lut16_.push_back(std::move(lut16));
  }
  return r;
}

Json PreprocessRecipe::to_json() const {
  Json j = Json::array();
  for (const auto& op : ops_) j.push_back(op_to_json(op));
  return j;
}

std::string PreprocessRecipe::fingerprint() const {
  // FNV-1a 64: stable across platforms and library versions (unlike std::hash).
  int version = 1;
  for (const auto& op : ops_) version = std::max(version, op_version(op));
  const std::string text = "lancet-preprocess-v" + std::to_string(version) + ":" + to_json().dump();
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return "pp" + std::to_string(version) + "-" + buf;
}

void PreprocessRecipe::apply(cv::Mat& image) const {
  for (size_t i = 0; i < ops_.size(); ++i) {
    const std::string at = where_ + "[" + std::to_string(i) + "] (" + preprocess_op_name(ops_[i].kind) + ")";
    const int depth = image.depth(), channels = image.channels();
    LANCET_CHECK(!image.empty() && (depth == CV_8U || depth == CV_16U) && (channels == 1 || channels == 3),
                 at << ": unsupported image " << (image.empty() ? "(empty)" : cv::typeToString(image.type()))
                    << " (need 8- or 16-bit gray or RGB)");
    cv::Mat out;
    try {
      run_op(ops_[i], lut8_[i], lut16_[i], image, out, at);
    } catch (const cv::Exception& e) {
      LANCET_FAIL(at << ": OpenCV: " << e.err);
    }
    image = out;
  }
}

}  // namespace lancet
