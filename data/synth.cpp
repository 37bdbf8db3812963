#include "data/synth.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>

#include "kernels/parallel.h"

namespace fs = std::filesystem;

namespace lancet {

namespace {

constexpr double kPi = 3.14159265358979323846;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A small deterministic generator (xorshift64*, seeded through splitmix64): the same
// numbers on every platform and standard library, unlike std::*_distribution.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(splitmix64(seed) | 1) {}
  uint64_t next() {
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    return s_ * 0x2545F4914F6CDD1Dull;
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double uniform(double a, double b) { return a + (b - a) * uniform(); }
  double normal() {  // Box-Muller
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * kPi * u2);
  }

 private:
  uint64_t s_;
};

double smoothstep(double e0, double e1, double x) {
  const double t = std::clamp((x - e0) / (e1 - e0), 0.0, 1.0);
  return t * t * (3 - 2 * t);
}

// A thin bright curve: intensity of a band at signed distance d with half-width w.
double band(double d, double w) { return std::exp(-(d * d) / (w * w)); }

struct Segment {  // a vascular marking: a tapering line from a to b
  double ax, ay, bx, by, width, amp;
};

struct Blob {  // an opacity: rotated super-Gaussian with low-frequency texture
  double cx, cy, rx, ry, cos_t, sin_t, power, amp, tex_fx, tex_fy, tex_phase;
};

struct Hilum {
  double x, y, r, amp;
};

struct Lung {
  double cx, cy, rx, ry, dome;  // centre, half-axes, height of the diaphragm dome
};

// The anatomy of one image, in "anatomy" coordinates: u (right of image) and v (down), the
// film spanning about [-1, 1] in both before the pose transform.
struct Anatomy {
  double scale, cos_r, sin_r, tx, ty;             // pose
  double background, body, body_w, neck_w, shoulder;
  Lung lung[2];                                   // image-left (patient right), image-right
  double lung_depth;                              // how much darker the lungs are
  double med_w, med_amp;                          // mediastinum half-width and brightness
  double heart_cx, heart_cy, heart_rx, heart_ry;  // heart (bulges into the image-right lung)
  double spine_w, spine_amp;
  double rib_v0, rib_spacing, rib_w, rib_amp, rib_curve;
  double clav_amp;
  double grad_u, grad_v;                          // exposure gradient
  double wave[4][4];                              // smooth random field: fx, fy, phase, amp
  std::vector<Segment> vessels;
  Hilum hila[2];
  double gain, offset, gamma, noise;              // contrast and film grain
};

// 1 inside the lung (before the mediastinum and heart are cut out), 0 outside, soft edge.
double lung_mask(const Lung& l, double u, double v) {
  const double du = (u - l.cx) / l.rx, dv = (v - l.cy) / l.ry;
  // A rounded apex above the centre; below it the lung widens and runs down to the dome.
  const double r = std::sqrt(du * du + (dv < 0 ? dv * dv : 0.3 * dv * dv));
  const double dome = l.cy + 0.95 * l.ry - l.dome * std::max(0.0, 1.0 - du * du);
  return (1.0 - smoothstep(0.86, 1.0, r)) * (1.0 - smoothstep(dome - 0.03, dome + 0.03, v));
}

double heart_mask(const Anatomy& a, double u, double v) {
  const double hu = (u - a.heart_cx) / a.heart_rx, hv = (v - a.heart_cy) / a.heart_ry;
  return 1.0 - smoothstep(0.85, 1.05, std::sqrt(hu * hu + hv * hv));
}

double mediastinum_mask(const Anatomy& a, double u, double v) {
  const double w = a.med_w * (1.0 + 0.35 * smoothstep(-0.4, 0.2, v));  // widens towards the heart
  return (1.0 - smoothstep(w - 0.03, w + 0.03, std::abs(u - 0.02))) * smoothstep(-1.05, -0.75, v);
}

// The aerated lung: both lungs less the mediastinum and the heart.
double air_mask(const Anatomy& a, double u, double v) {
  const double lm = std::max(lung_mask(a.lung[0], u, v), lung_mask(a.lung[1], u, v));
  return lm * (1.0 - mediastinum_mask(a, u, v)) * (1.0 - heart_mask(a, u, v));
}

Anatomy make_anatomy(Rng& g) {
  Anatomy a;
  a.scale = g.uniform(0.92, 1.06);
  const double rot = g.uniform(-4, 4) * kPi / 180;
  a.cos_r = std::cos(rot), a.sin_r = std::sin(rot);
  a.tx = g.uniform(-0.05, 0.05), a.ty = g.uniform(-0.04, 0.06);
  a.background = g.uniform(0.02, 0.08);
  a.body = g.uniform(0.5, 0.6);
  a.body_w = g.uniform(0.9, 1.0);
  a.neck_w = g.uniform(0.22, 0.28);
  a.shoulder = g.uniform(-0.86, -0.78);
  const double lrx = g.uniform(0.3, 0.35), lry = g.uniform(0.58, 0.66), lcy = g.uniform(-0.08, 0.0);
  a.lung[0] = {-0.42 + g.uniform(-0.03, 0.03), lcy, lrx, lry, g.uniform(0.12, 0.2)};
  a.lung[1] = {0.42 + g.uniform(-0.03, 0.03), lcy + g.uniform(0.02, 0.06), lrx * g.uniform(0.92, 1.0), lry,
               g.uniform(0.12, 0.2)};
  a.lung_depth = g.uniform(0.26, 0.34);
  a.med_w = g.uniform(0.1, 0.13), a.med_amp = g.uniform(0.06, 0.1);
  a.heart_cx = g.uniform(0.12, 0.2), a.heart_cy = g.uniform(0.36, 0.44);
  a.heart_rx = g.uniform(0.32, 0.4), a.heart_ry = g.uniform(0.24, 0.3);
  a.spine_w = g.uniform(0.05, 0.065), a.spine_amp = g.uniform(0.04, 0.07);
  a.rib_v0 = g.uniform(-0.8, -0.72), a.rib_spacing = g.uniform(0.12, 0.14);
  a.rib_w = g.uniform(0.024, 0.03), a.rib_amp = g.uniform(0.08, 0.12), a.rib_curve = g.uniform(0.55, 0.75);
  a.clav_amp = g.uniform(0.1, 0.15);
  a.grad_u = g.uniform(-0.06, 0.06), a.grad_v = g.uniform(-0.06, 0.06);
  for (auto& w : a.wave) {
    const double ang = g.uniform(0, 2 * kPi), f = g.uniform(0.5, 1.6);
    w[0] = f * std::cos(ang), w[1] = f * std::sin(ang), w[2] = g.uniform(0, 2 * kPi), w[3] = g.uniform(0.005, 0.02);
  }
  // Vascular markings fan out from each hilum: bright-ish lines in both classes, so that
  // "something bright inside the lung" alone does not mean opacity.
  for (int side = 0; side < 2; ++side) {
    const Lung& l = a.lung[side];
    const double hx = l.cx + (side == 0 ? 0.6 : -0.6) * l.rx, hy = l.cy + 0.08;
    a.hila[side] = {hx, hy, g.uniform(0.05, 0.08), g.uniform(0.03, 0.06)};
    const int n = 6 + static_cast<int>(g.uniform(0, 5));
    for (int k = 0; k < n; ++k) {
      const double ang = (side == 0 ? kPi : 0.0) + (side == 0 ? -1 : 1) * g.uniform(-1.4, 1.4);
      const double len = g.uniform(0.15, 0.45);
      const double x0 = hx + g.uniform(-0.04, 0.04), y0 = hy + g.uniform(-0.08, 0.08);
      a.vessels.push_back({x0, y0, x0 + len * std::cos(ang), y0 + len * std::sin(ang), g.uniform(0.012, 0.022),
                           g.uniform(0.02, 0.04)});
    }
  }
  a.gain = g.uniform(0.85, 1.15);
  a.offset = g.uniform(-0.05, 0.05);
  a.gamma = g.uniform(0.85, 1.15);
  a.noise = g.uniform(0.015, 0.03);
  return a;
}

Blob make_blob(Rng& g, const Anatomy& a) {
  Blob b;
  for (int tries = 0;; ++tries) {  // a centre well inside the aerated lung
    const Lung& l = a.lung[g.uniform() < 0.5 ? 0 : 1];
    b.cx = l.cx + g.uniform(-0.8, 0.8) * l.rx;
    b.cy = l.cy + g.uniform(-0.75, 0.9) * l.ry;
    if (air_mask(a, b.cx, b.cy) > 0.95 || tries > 100) break;
  }
  const double r = g.uniform(0.09, 0.19), aspect = g.uniform(0.6, 1.0), th = g.uniform(0, kPi);
  b.rx = r, b.ry = r * aspect, b.cos_t = std::cos(th), b.sin_t = std::sin(th);
  b.power = g.uniform(1.0, 2.2);  // 1: Gaussian (soft edge), >1: flatter top, firmer edge
  // Contrast: mostly clear, some faint (the hard cases).
  b.amp = g.uniform() < 0.15 ? g.uniform(0.08, 0.12) : g.uniform(0.12, 0.28);
  b.tex_fx = g.uniform(4, 10), b.tex_fy = g.uniform(4, 10), b.tex_phase = g.uniform(0, 2 * kPi);
  return b;
}

// Intensity of the film (before noise and contrast) at anatomy point (u, v).
double film(const Anatomy& a, double u, double v) {
  // Body: the thorax below a sloping shoulder line, and the neck above it.
  const double bu = u / a.body_w;
  const double top = a.shoulder + 0.3 * bu * bu;
  const double torso = (1.0 - smoothstep(0.95, 1.02, std::abs(bu))) * smoothstep(top - 0.04, top + 0.04, v);
  const double neck = 1.0 - smoothstep(a.neck_w - 0.03, a.neck_w + 0.03, std::abs(u));
  const double body = std::max(torso, neck);
  const double thick = 0.85 + 0.15 * (1.0 - std::min(1.0, bu * bu));  // thicker in the middle: brighter
  double I = a.background + body * (a.body * thick - a.background);
  // Mediastinum, heart and the abdomen below the diaphragm: denser than the chest wall.
  const Lung& l = u < 0 ? a.lung[0] : a.lung[1];
  const double ldu = std::clamp((u - l.cx) / l.rx, -1.0, 1.0);
  const double diaphragm = l.cy + 0.95 * l.ry - l.dome * (1.0 - ldu * ldu);
  const double abdomen = smoothstep(diaphragm - 0.02, diaphragm + 0.1, v);
  const double med = mediastinum_mask(a, u, v), heart = heart_mask(a, u, v);
  I += a.med_amp * std::max({med, heart, abdomen}) * body;
  const double air = air_mask(a, u, v);
  // Darkest in the upper lateral zones, lighter near the hila and the bases.
  const double lat = std::min(1.0, std::abs(u - l.cx + (l.cx < 0 ? 0.5 : -0.5) * l.rx) / l.rx);
  const double zone = 0.8 + 0.1 * lat + 0.1 * (1.0 - smoothstep(-0.5, 0.6, v - l.cy));
  I -= a.lung_depth * air * zone * body;
  // Spine: a column with vertebral banding, seen through the mediastinum.
  const double spine = (1.0 - smoothstep(a.spine_w * 0.7, a.spine_w * 1.2, std::abs(u))) * smoothstep(-1.1, -0.9, v);
  I += a.spine_amp * spine * (0.6 + 0.4 * std::cos(v * 2 * kPi / a.rib_spacing)) * body;
  // Posterior ribs: arcs that leave the spine, rise a little, then curve down laterally;
  // anterior ribs: fainter lines that slope down towards the midline. Both show best over
  // the aerated lung and hardly over the mediastinum.
  const double d = std::abs(u);
  if (d > 0.05 && body > 0.01) {
    double ribs = 0;
    const double lateral = smoothstep(0.06, 0.14, d) * (1.0 - smoothstep(a.body_w - 0.12, a.body_w - 0.02, d));
    for (int k = 0; k < 10; ++k) {
      const double vk = a.rib_v0 + k * a.rib_spacing * (1 + 0.04 * k) - 0.2 * d + a.rib_curve * d * d;
      const double w = a.rib_w * (1 + 0.5 * d);
      if (std::abs(v - vk) < 4 * w)  // band() is ~0 further out
        ribs += band(v - vk, w) * (0.7 + 0.3 * band(std::abs(v - vk) - w, 0.4 * w));  // brighter cortex
      const double va = a.rib_v0 + 0.1 + k * a.rib_spacing * 0.95 + 0.45 * (0.9 - d) * (0.9 - d);
      if (std::abs(v - va) < 6 * a.rib_w) ribs += 0.35 * band(v - va, a.rib_w * 1.4) * smoothstep(0.2, 0.4, d);
    }
    I += a.rib_amp * ribs * lateral * (0.3 + 0.7 * air) * (1.0 - 0.8 * med) * body;
    // Clavicles: near-horizontal bands from the sternum out to the shoulders.
    const double vc = a.shoulder + 0.1 - 0.1 * d + 0.22 * d * d;
    I += a.clav_amp * band(v - vc, 0.035) * smoothstep(0.06, 0.12, d) * (1.0 - smoothstep(0.65, 0.8, d));
  }
  // Vessels: taper and fade from the hilum outwards; only visible inside the lungs.
  // The max, not the sum: vessels sharing a hilum must not pile up into a bright spot.
  double vess = 0;
  for (const Segment& s : a.vessels) {
    if (air <= 0) break;
    const double ex = s.bx - s.ax, ey = s.by - s.ay;
    const double t = std::clamp(((u - s.ax) * ex + (v - s.ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0);
    const double px = u - (s.ax + t * ex), py = v - (s.ay + t * ey);
    vess = std::max(vess, s.amp * (1.0 - 0.7 * t) * band(std::sqrt(px * px + py * py), s.width * (1.0 - 0.5 * t)));
  }
  // Hilar shadows: soft brighter areas where the vessels enter, in both classes.
  for (const Hilum& h : a.hila) {
    const double du = (u - h.x) / h.r, dv = (v - h.y) / (1.6 * h.r);
    vess += h.amp * std::exp(-(du * du + dv * dv));
  }
  I += vess * air;
  // Exposure: a gradient across the film and a smooth random field.
  double field = 1.0 + a.grad_u * u + a.grad_v * v;
  for (const auto& w : a.wave) field += w[3] * std::cos(kPi * (w[0] * u + w[1] * v) + w[2]);
  return I * field;
}

// Opacity intensity at (u, v), mostly confined to the aerated lung (consolidation stops at
// the pleura; over the heart or below the diaphragm it barely shows).
double opacity(const Anatomy& a, const std::vector<Blob>& blobs, double u, double v) {
  double o = 0;
  for (const Blob& b : blobs) {
    const double du = u - b.cx, dv = v - b.cy;
    const double x = (du * b.cos_t + dv * b.sin_t) / b.rx, y = (-du * b.sin_t + dv * b.cos_t) / b.ry;
    const double r2 = x * x + y * y;
    if (r2 > 9) continue;
    const double tex = 0.8 + 0.2 * std::cos(b.tex_fx * u + b.tex_phase) * std::cos(b.tex_fy * v - b.tex_phase);
    o += b.amp * std::exp(-std::pow(r2, b.power)) * tex;
  }
  return o == 0 ? 0 : o * (0.2 + 0.8 * air_mask(a, u, v));
}

}  // namespace

const std::vector<std::string>& synth_class_names() {
  static const std::vector<std::string> names{"normal", "opacity"};
  return names;
}

std::vector<uint8_t> synth_cxr_image(int size, int label, uint64_t seed, int64_t index) {
  LANCET_CHECK(size >= 8, "synthetic image size must be at least 8, got " << size);
  LANCET_CHECK(label == 0 || label == 1, "synthetic label must be 0 or 1, got " << label);
  // Independent streams for anatomy, opacities and noise, so both labels share anatomy.
  const uint64_t base = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(index)));
  Rng ga(base), go(base ^ 0x6F7061636974795Full), gn(base ^ 0x6E6F6973655F5F5Full);
  const Anatomy a = make_anatomy(ga);
  std::vector<Blob> blobs;
  if (label == 1) {
    const double r = go.uniform();
    const int count = r < 0.5 ? 1 : r < 0.8 ? 2 : 3;
    for (int k = 0; k < count; ++k) blobs.push_back(make_blob(go, a));
  }
  const size_t n = static_cast<size_t>(size) * static_cast<size_t>(size);
  std::vector<double> img(n), op(n, 0.0);
  double op_sum = 0, img_sum = 0;
  for (int y = 0; y < size; ++y) {
    for (int x = 0; x < size; ++x) {
      // Pixel centre in [-1, 1], then the inverse pose into anatomy coordinates.
      const double px = (x + 0.5) / size * 2 - 1 - a.tx, py = (y + 0.5) / size * 2 - 1 - a.ty;
      const double u = (a.cos_r * px + a.sin_r * py) / a.scale, v = (-a.sin_r * px + a.cos_r * py) / a.scale;
      const size_t i = static_cast<size_t>(y) * static_cast<size_t>(size) + static_cast<size_t>(x);
      img[i] = film(a, u, v);
      img_sum += img[i];
      if (!blobs.empty()) op_sum += op[i] = opacity(a, blobs, u, v);
    }
  }
  // Brightness compensation: scale the film so that film + opacity has the film's mean.
  const double comp = img_sum > 0 ? (img_sum - op_sum) / img_sum : 1.0;
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) {
    double v = img[i] * comp + op[i] + a.noise * gn.normal();
    v = a.gain * std::pow(std::clamp(v, 0.0, 1.0), a.gamma) + a.offset;
    out[i] = static_cast<uint8_t>(std::lround(std::clamp(v, 0.0, 1.0) * 255.0));
  }
  return out;
}

int synth_label(const SynthOptions& opt, int64_t index) {
  // positives(n) = round(n * f), halves rounded down, among the first n images, spread
  // evenly through the indices (f = 0.5: 0, 1, 0, 1, ...).
  const double f = opt.positive_fraction;
  auto positives = [f](int64_t n) { return std::ceil(static_cast<double>(n) * f - 0.5); };
  return static_cast<int>(positives(index + 1) - positives(index));
}

uint64_t synth_split_seed(const SynthOptions& opt, const std::string& split) {
  LANCET_CHECK(split == "train" || split == "val", "synthetic split must be 'train' or 'val', got '" << split << "'");
  return splitmix64(opt.seed ^ (split == "train" ? 0x747261696E000000ull : 0x76616C0000000000ull));
}

namespace {

void check_synth_options(const SynthOptions& opt) {
  LANCET_CHECK(opt.train >= 0 && opt.val >= 0, "synthetic dataset sizes must be non-negative");
  LANCET_CHECK(opt.image_size >= 8, "synthetic image size must be at least 8, got " << opt.image_size);
  LANCET_CHECK(opt.positive_fraction >= 0 && opt.positive_fraction <= 1,
               "positive_fraction must be in [0, 1], got " << opt.positive_fraction);
}

// Runs fn(i) for i in [0, n) in parallel; rethrows the error of the lowest failing i.
template <typename F>
void parallel_each(int64_t n, F&& fn) {
  std::mutex mu;
  int64_t first_bad = n;
  std::string first_error;
  parallel_for(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      try {
        fn(i);
      } catch (const std::exception& e) {  // exceptions must not escape an OpenMP region
        std::lock_guard<std::mutex> lock(mu);
        if (i < first_bad) first_bad = i, first_error = e.what();
      }
    }
  });
  if (first_bad < n) throw Error(first_error);
}

void write_synthetic_folder(const std::string& dir, const SynthOptions& opt, bool overwrite) {
  const fs::path target(dir);
  std::error_code ec;
  if (fs::exists(target)) {
    LANCET_CHECK(fs::is_directory(target), dir << ": exists and is not a directory");
    LANCET_CHECK(overwrite || fs::is_empty(target), dir << ": exists and is not empty (pass overwrite to replace it)");
  }
  const std::string tmp = dir + ".tmp-" + std::to_string(::getpid());
  struct Cleanup {  // removes the half-built folder on any failure
    std::string path;
    ~Cleanup() {
      std::error_code e;
      if (!path.empty()) fs::remove_all(path, e);
    }
  } cleanup{tmp};
  fs::remove_all(tmp, ec);
  for (const char* s : {"train", "val"})
    for (const std::string& c : synth_class_names()) fs::create_directories(fs::path(tmp) / s / c);

  struct Entry {
    const char* split;
    int64_t index;
  };
  std::vector<Entry> entries;
  for (int64_t i = 0; i < opt.train; ++i) entries.push_back({"train", i});
  for (int64_t i = 0; i < opt.val; ++i) entries.push_back({"val", i});
  const uint64_t seeds[2] = {synth_split_seed(opt, "train"), synth_split_seed(opt, "val")};
  auto rel = [&](const Entry& e) {
    return std::string(e.split) + "/" + synth_class_names()[synth_label(opt, e.index)] + "/" +
           std::to_string(e.index) + ".png";
  };
  cv::setNumThreads(0);
  parallel_each(static_cast<int64_t>(entries.size()), [&](int64_t k) {
    const Entry& e = entries[static_cast<size_t>(k)];
    std::vector<uint8_t> px =
        synth_cxr_image(opt.image_size, synth_label(opt, e.index), seeds[e.split[0] == 'v'], e.index);
    const cv::Mat m(opt.image_size, opt.image_size, CV_8UC1, px.data());
    const std::string file = tmp + "/" + rel(e);
    LANCET_CHECK(cv::imwrite(file, m), file << ": cannot write PNG");
  });
  {
    const std::string mpath = tmp + "/manifest.csv";
    std::ofstream m(mpath);
    m << "path,label,split\n";
    for (const Entry& e : entries)
      m << rel(e) << "," << synth_class_names()[synth_label(opt, e.index)] << "," << e.split << "\n";
    m.close();
    LANCET_CHECK(m, mpath << ": cannot write");
  }
  // Swap the finished folder in. An existing target moves aside first (rename cannot
  // replace a non-empty directory) and is deleted only once the new one is in place.
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  const std::string old = dir + ".old-" + std::to_string(::getpid());
  const bool had = fs::exists(target);
  if (had) fs::rename(target, old);
  fs::rename(tmp, target, ec);
  if (ec) {
    if (had) fs::rename(old, target);
    LANCET_FAIL(dir << ": cannot move the generated dataset into place: " << ec.message());
  }
  cleanup.path.clear();
  if (had) fs::remove_all(old, ec);
}

}  // namespace

void write_synthetic_cxr(const std::string& dir, const SynthOptions& opt, bool overwrite) {
  check_synth_options(opt);
  try {
    write_synthetic_folder(dir, opt, overwrite);
  } catch (const fs::filesystem_error& e) {  // keep the one-line lancet::Error contract
    LANCET_FAIL(dir << ": " << e.what());
  }
}

std::unique_ptr<InMemoryDataset> make_synthetic_cxr(const SynthOptions& opt, const std::string& split,
                                                    const ImageLoadOptions& load) {
  check_synth_options(opt);
  check_load_options(load);
  const uint64_t seed = synth_split_seed(opt, split);
  const int64_t n = split == "train" ? opt.train : opt.val;
  const int64_t s = load.image_size;
  Tensor images = Tensor::empty({n, load.channels, s, s});
  float* base = images.data<float>();
  const int64_t per = load.channels * s * s;
  std::vector<int64_t> labels(static_cast<size_t>(n));
  cv::setNumThreads(0);
  parallel_each(n, [&](int64_t i) {
    labels[static_cast<size_t>(i)] = synth_label(opt, i);
    const std::vector<uint8_t> px = synth_cxr_image(opt.image_size, synth_label(opt, i), seed, i);
    preprocess_image(px.data(), opt.image_size, opt.image_size, 1, load, base + i * per);
  });
  return std::make_unique<InMemoryDataset>(std::move(images), std::move(labels), synth_class_names());
}

}  // namespace lancet
