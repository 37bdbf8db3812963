// conv.cpp — CPU Conv2d: im2col + sgemm, with col2im for the input gradient.
//
// Work is cut into tasks by shape only (never by thread count), each task runs single-threaded
// sgemm calls on a worker (see cpu::BlasSerial), so results are bit-identical for any
// set_num_threads and the cores are never oversubscribed.
//   forward: tasks are column ranges of the [K x N*Ho*Wo] column matrix. Large planes are
//     split into blocks within an image and written straight into y; small planes (the late
//     stages, 2x2 or 4x4) batch several images into one wider GEMM and scatter to NCHW.
//   dx: tasks are (image chunk, group, input-channel block); each owns its dx planes, so
//     col2im needs no atomics and its summation order is fixed.
//   dw: when dw is small next to the batch's columns (stem, first stage), tasks are image
//     ranges with private partial dw, added up in task order; otherwise tasks are (group,
//     block of rows of K), each owning its dw columns and looping over all images. Either way
//     the reduction over the batch has a fixed order.
// 1x1 stride-1 unpadded convs read x (write dx) directly when a task covers a single image.
// 3x3 stride-1 convs with enough channels take the Winograd path instead (conv_winograd.h).
// Scratch slots per task: 0 column matrix, 1 gathered dy / GEMM output, 2 padded planes; the
// calling thread's slot 3 holds the partial dw of backward_dw_partials.
// Memory formats: the kernels below are written for nchw. A channels_last x / y / dy / dx (one
// format for the four) or w / dw (each either format) is converted to an nchw copy, the nchw
// code runs on the copies, and the results are converted back (dw: its values are copied in
// first and the gradient accumulated onto them), so every bit equals the nchw call's.
#include "kernels/conv.h"

#include <atomic>
#include <cstring>

#include "kernels/conv_winograd.h"
#include "kernels/cpu_util.h"
#include "kernels/cuda_twin.h"
#include "kernels/elementwise.h"
#include "kernels/trace.h"
#ifdef LANCET_WITH_CUDA
#include "kernels/cuda/conv.h"
#endif

namespace lancet {
namespace {

using cpu::ceil_div;

// Column-matrix workspace per task is kept near this many floats (fits L2/L3 comfortably).
constexpr int64_t kMaxColFloats = int64_t{1} << 20;

struct Geom {
  int64_t N, C, H, W;      // input
  int64_t Co, KH, KW;      // weight
  int64_t Ho, Wo, P;       // output plane, P = Ho * Wo
  int64_t G, Cg, Cog, Kg;  // groups; input / output channels per group; K rows per group
  int64_t sh, sw, ph, pw, dh, dw;
  bool pointwise;  // 1x1, stride 1, no padding: x's planes are the column matrix
  int64_t tc;      // target columns per forward task (a function of the shape only)
};

Geom make_geom(const Conv2dParams& p, const Shape& x, const Shape& w) {
  const Shape y = conv2d_output_shape(p, x, w);
  Geom g{};
  g.N = x[0], g.C = x[1], g.H = x[2], g.W = x[3];
  g.Co = w[0], g.KH = w[2], g.KW = w[3];
  g.Ho = y[2], g.Wo = y[3], g.P = g.Ho * g.Wo;
  g.G = p.groups, g.Cg = g.C / g.G, g.Cog = g.Co / g.G, g.Kg = g.Cg * g.KH * g.KW;
  g.sh = p.stride_h, g.sw = p.stride_w, g.ph = p.pad_h, g.pw = p.pad_w, g.dh = p.dilation_h, g.dw = p.dilation_w;
  g.pointwise = g.KH == 1 && g.KW == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  // About 8 tasks per batch, each between 64 and 512 columns wide (a multiple of 16).
  g.tc = std::min<int64_t>(512, std::max<int64_t>(64, ceil_div(g.N * g.P, 8 * 16) * 16));
  return g;
}

int64_t padded_plane(const Geom& g) { return (g.H + 2 * g.ph) * (g.W + 2 * g.pw); }

// Zero-padded copies of channel c's planes of images [n0, n1), each (H + 2 ph) x (W + 2 pw),
// so that im2col and col2im need no bounds checks.
void pad_planes(const Geom& g, const float* x, int64_t c, int64_t n0, int64_t n1, float* pad) {
  const int64_t Wp = g.W + 2 * g.pw;
  for (int64_t n = n0; n < n1; ++n) {
    float* dst = pad + (n - n0) * padded_plane(g);
    std::fill(dst, dst + g.ph * Wp, 0.f);
    for (int64_t h = 0; h < g.H; ++h) {
      float* row = dst + (h + g.ph) * Wp;
      std::fill(row, row + g.pw, 0.f);
      std::memcpy(row + g.pw, x + ((n * g.C + c) * g.H + h) * g.W, static_cast<size_t>(g.W) * sizeof(float));
      std::fill(row + g.pw + g.W, row + Wp, 0.f);
    }
    std::fill(dst + (g.H + g.ph) * Wp, dst + padded_plane(g), 0.f);
  }
}

// The column matrix for rows [r0, r1) of the full C*KH*KW rows (r = (c, kh, kw)) and the
// columns of output positions [p0, p1) of each image in [n0, n1) (a position range other than
// [0, P) only with a single image): col[r - r0][(n - n0) * (p1 - p0) + p - p0].
void im2col(const Geom& g, const float* x, int64_t r0, int64_t r1, int64_t n0, int64_t n1, int64_t p0, int64_t p1,
            float* col) {
  const int64_t khw = g.KH * g.KW, Wp = g.W + 2 * g.pw, plane = padded_plane(g), len = p1 - p0;
  const int64_t ncols = (n1 - n0) * len, oh_first = p0 / g.Wo, oh_last = (p1 - 1) / g.Wo;
  float* pad = cpu::scratch(2, static_cast<size_t>((n1 - n0) * plane));
  int64_t padded_c = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r / khw, kh = (r % khw) / g.KW, kw = r % g.KW;
    if (c != padded_c) pad_planes(g, x, c, n0, n1, pad), padded_c = c;
    for (int64_t n = n0; n < n1; ++n) {
      const float* src = pad + (n - n0) * plane + kh * g.dh * Wp + kw * g.dw;
      float* dst = col + (r - r0) * ncols + (n - n0) * len;  // dst[p - p0]
      for (int64_t oh = oh_first; oh <= oh_last; ++oh) {
        const int64_t a = oh == oh_first ? p0 - oh * g.Wo : 0, b = oh == oh_last ? p1 - oh * g.Wo : g.Wo;
        const float* s = src + oh * g.sh * Wp;
        float* d = dst + oh * g.Wo + a - p0;
        if (g.sw == 1) {
          for (int64_t ow = a; ow < b; ++ow) d[ow - a] = s[ow];
        } else {
          for (int64_t ow = a; ow < b; ++ow) d[ow - a] = s[ow * g.sw];
        }
      }
    }
  }
}

// dx[n, c] = sum over the rows of channel c of dcol, for c in [c0, c1) and n in [n0, n1).
// dcol holds rows [c0*KH*KW, c1*KH*KW) for the columns of those whole images. Overwrites.
void col2im(const Geom& g, const float* dcol, int64_t c0, int64_t c1, int64_t n0, int64_t n1, float* dx) {
  const int64_t ncols = (n1 - n0) * g.P, khw = g.KH * g.KW, Wp = g.W + 2 * g.pw, plane = padded_plane(g);
  float* pad = cpu::scratch(2, static_cast<size_t>(plane));
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(pad, pad + plane, 0.f);
      for (int64_t k = 0; k < khw; ++k) {
        float* base = pad + (k / g.KW) * g.dh * Wp + (k % g.KW) * g.dw;
        const float* src = dcol + ((c - c0) * khw + k) * ncols + (n - n0) * g.P;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          float* d = base + oh * g.sh * Wp;
          const float* s = src + oh * g.Wo;
          for (int64_t ow = 0; ow < g.Wo; ++ow) d[ow * g.sw] += s[ow];
        }
      }
      for (int64_t h = 0; h < g.H; ++h)
        std::memcpy(dx + ((n * g.C + c) * g.H + h) * g.W, pad + (h + g.ph) * Wp + g.pw,
                    static_cast<size_t>(g.W) * sizeof(float));
    }
  }
}

// out[co][(n - n0) * P + p] = t[n, c0 + co, p]: channels [c0, c0 + nc) of images [n0, n1) of
// an NCHW tensor as one [nc x (n1-n0)*P] matrix.
void gather_channels(const Geom& g, const float* t, int64_t channels, int64_t c0, int64_t nc, int64_t n0, int64_t n1,
                     float* out) {
  const int64_t ncols = (n1 - n0) * g.P;
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t n = n0; n < n1; ++n)
      std::memcpy(out + c * ncols + (n - n0) * g.P, t + (n * channels + c0 + c) * g.P,
                  static_cast<size_t>(g.P) * sizeof(float));
}

// A range of output columns: one image's [p0, p1), or whole images [n0, n1).
struct ColumnTask {
  int64_t n0, n1, p0, p1;
};

ColumnTask forward_task(const Geom& g, int64_t t) {
  if (g.P >= g.tc) {
    const int64_t per_image = ceil_div(g.P, g.tc), width = ceil_div(g.P, per_image);
    const int64_t n = t / per_image, p0 = (t % per_image) * width;
    return {n, n + 1, p0, std::min(g.P, p0 + width)};
  }
  const int64_t nb = std::min(g.N, g.tc / g.P);
  return {t * nb, std::min(g.N, (t + 1) * nb), 0, g.P};
}

int64_t forward_task_count(const Geom& g) {
  if (g.P >= g.tc) return g.N * ceil_div(g.P, g.tc);  // blocks per image as in forward_task
  return ceil_div(g.N, std::min(g.N, g.tc / g.P));
}

void forward_task_run(const Geom& g, const ColumnTask& t, const float* x, const float* w, const float* b, float* y) {
  const bool single = t.n1 - t.n0 == 1;
  const int64_t cols = (t.n1 - t.n0) * (t.p1 - t.p0);
  const float* colp;
  int64_t ldcol;
  if (g.pointwise && single) {
    colp = x + t.n0 * g.C * g.P + t.p0, ldcol = g.P;
  } else {
    float* buf = cpu::scratch(0, static_cast<size_t>(g.G * g.Kg * cols));
    im2col(g, x, 0, g.G * g.Kg, t.n0, t.n1, t.p0, t.p1, buf);
    colp = buf, ldcol = cols;
  }
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const float* A = w + gi * g.Cog * g.Kg;
    const float* B = colp + gi * g.Kg * ldcol;
    if (single) {
      float* out = y + (t.n0 * g.Co + gi * g.Cog) * g.P + t.p0;
      if (b) {
        for (int64_t co = 0; co < g.Cog; ++co) std::fill(out + co * g.P, out + co * g.P + cols, b[gi * g.Cog + co]);
      }
      sgemm(false, false, int(g.Cog), int(cols), int(g.Kg), 1.f, A, int(g.Kg), B, int(ldcol), b ? 1.f : 0.f, out,
            int(g.P));
    } else {
      float* out = cpu::scratch(1, static_cast<size_t>(g.Cog * cols));
      sgemm(false, false, int(g.Cog), int(cols), int(g.Kg), 1.f, A, int(g.Kg), B, int(ldcol), 0.f, out, int(cols));
      for (int64_t co = 0; co < g.Cog; ++co) {
        const int64_t oc = gi * g.Cog + co;
        const float bias = b ? b[oc] : 0.f;
        for (int64_t n = t.n0; n < t.n1; ++n) {
          const float* src = out + co * cols + (n - t.n0) * g.P;
          float* dst = y + (n * g.Co + oc) * g.P;
          for (int64_t p = 0; p < g.P; ++p) dst[p] = src[p] + bias;
        }
      }
    }
  }
}

// Images per task for the backward passes: whole images, about tc columns.
int64_t backward_images_per_task(const Geom& g) { return std::max<int64_t>(1, std::min(g.N, g.tc / g.P)); }

void backward_dx(const Geom& g, const float* w, const float* dy, float* dx) {
  const int64_t nb = backward_images_per_task(g), chunks = ceil_div(g.N, nb), khw = g.KH * g.KW;
  // Split a group's input channels when the dcol block would outgrow the workspace target.
  const int64_t blocks = std::min(g.Cg, std::max<int64_t>(1, ceil_div(g.Kg * nb * g.P, kMaxColFloats)));
  const int64_t cb = ceil_div(g.Cg, blocks);
  const int64_t tasks = chunks * g.G * blocks;
  cpu::BlasSerial serial;
  parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t / (g.G * blocks), gi = (t / blocks) % g.G, blk = t % blocks;
      const int64_t n0 = chunk * nb, n1 = std::min(g.N, n0 + nb), cols = (n1 - n0) * g.P;
      const int64_t c0 = blk * cb, c1 = std::min(g.Cg, c0 + cb);  // within the group
      if (c0 >= c1) continue;
      const float* dyp = dy + (n0 * g.Co + gi * g.Cog) * g.P;
      int64_t lddy = g.P;
      if (n1 - n0 > 1) {
        float* buf = cpu::scratch(1, static_cast<size_t>(g.Cog * cols));
        gather_channels(g, dy, g.Co, gi * g.Cog, g.Cog, n0, n1, buf);
        dyp = buf, lddy = cols;
      }
      const float* A = w + gi * g.Cog * g.Kg + c0 * khw;  // W_g[:, rows of c0..c1), transposed
      const int64_t rows = (c1 - c0) * khw;
      if (g.pointwise && n1 - n0 == 1) {
        sgemm(true, false, int(rows), int(cols), int(g.Cog), 1.f, A, int(g.Kg), dyp, int(lddy), 0.f,
              dx + (n0 * g.C + gi * g.Cg + c0) * g.P, int(g.P));
      } else {
        float* dcol = cpu::scratch(0, static_cast<size_t>(rows * cols));
        sgemm(true, false, int(rows), int(cols), int(g.Cog), 1.f, A, int(g.Kg), dyp, int(lddy), 0.f, dcol, int(cols));
        col2im(g, dcol, gi * g.Cg + c0, gi * g.Cg + c1, n0, n1, dx);
      }
    }
  });
}

// dw by (group, block of rows of K) tasks; each owns its dw columns and loops over all images.
void backward_dw_row_blocks(const Geom& g, const float* x, const float* dy, float* dw) {
  // Up to 8 row blocks per group, at least 32 rows each.
  const int64_t blocks = std::min<int64_t>(8, std::max<int64_t>(1, g.Kg / 32));
  const int64_t rb = ceil_div(g.Kg, blocks);
  // Images per reduction step: as many as keep the dy and column blocks near the target size.
  const int64_t nb = std::max<int64_t>(1, std::min(g.N, kMaxColFloats / ((rb + g.Cog) * g.P)));
  cpu::BlasSerial serial;
  parallel_for(g.G * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t gi = t / blocks, r0 = (t % blocks) * rb, r1 = std::min(g.Kg, r0 + rb);
      if (r0 >= r1) continue;
      for (int64_t n0 = 0; n0 < g.N; n0 += nb) {
        const int64_t n1 = std::min(g.N, n0 + nb), cols = (n1 - n0) * g.P;
        const float* dyp = dy + (n0 * g.Co + gi * g.Cog) * g.P;
        int64_t lddy = g.P;
        if (n1 - n0 > 1) {
          float* buf = cpu::scratch(1, static_cast<size_t>(g.Cog * cols));
          gather_channels(g, dy, g.Co, gi * g.Cog, g.Cog, n0, n1, buf);
          dyp = buf, lddy = cols;
        }
        const float* B;  // [r1 - r0 x cols], used transposed
        int64_t ldb;
        if (g.pointwise && n1 - n0 == 1) {
          B = x + (n0 * g.C + gi * g.Cg + r0) * g.P, ldb = g.P;
        } else {
          float* col = cpu::scratch(0, static_cast<size_t>((r1 - r0) * cols));
          im2col(g, x, gi * g.Kg + r0, gi * g.Kg + r1, n0, n1, 0, g.P, col);
          B = col, ldb = cols;
        }
        sgemm(false, true, int(g.Cog), int(r1 - r0), int(cols), 1.f, dyp, int(lddy), B, int(ldb), 1.f,
              dw + gi * g.Cog * g.Kg + r0, int(g.Kg));
      }
    }
  });
}

// dw by image-range tasks, each into a private partial dw; the partials are then added to dw
// in task order. Best when dw is small next to the column matrix (stem, first stage).
void backward_dw_partials(const Geom& g, int64_t parts, const float* x, const float* dy, float* dw) {
  const int64_t per = ceil_div(g.N, parts), wsize = g.Co * g.Kg;
  float* partial = cpu::scratch(3, static_cast<size_t>(parts * wsize));  // this thread's; tasks use slots 0-2
  const int64_t nb = std::max<int64_t>(1, std::min(per, kMaxColFloats / ((g.G * g.Kg + g.Cog) * g.P)));
  {
    cpu::BlasSerial serial;
    parallel_for(parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* pw = partial + t * wsize;
        std::fill(pw, pw + wsize, 0.f);
        for (int64_t n0 = t * per; n0 < std::min(g.N, (t + 1) * per); n0 += nb) {
          const int64_t n1 = std::min({g.N, (t + 1) * per, n0 + nb}), cols = (n1 - n0) * g.P;
          const bool direct = g.pointwise && n1 - n0 == 1;
          float* col = nullptr;
          if (!direct) {
            col = cpu::scratch(0, static_cast<size_t>(g.G * g.Kg * cols));
            im2col(g, x, 0, g.G * g.Kg, n0, n1, 0, g.P, col);
          }
          for (int64_t gi = 0; gi < g.G; ++gi) {
            const float* dyp = dy + (n0 * g.Co + gi * g.Cog) * g.P;
            int64_t lddy = g.P;
            if (n1 - n0 > 1) {
              float* buf = cpu::scratch(1, static_cast<size_t>(g.Cog * cols));
              gather_channels(g, dy, g.Co, gi * g.Cog, g.Cog, n0, n1, buf);
              dyp = buf, lddy = cols;
            }
            const float* B = direct ? x + (n0 * g.C + gi * g.Cg) * g.P : col + gi * g.Kg * cols;
            sgemm(false, true, int(g.Cog), int(g.Kg), int(cols), 1.f, dyp, int(lddy), B, int(direct ? g.P : cols), 1.f,
                  pw + gi * g.Cog * g.Kg, int(g.Kg));
          }
        }
      }
    });
  }
  parallel_for(wsize, cpu::kElementwiseGrain / parts, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float sum = dw[i];
      for (int64_t t = 0; t < parts; ++t) sum += partial[t * wsize + i];
      dw[i] = sum;
    }
  });
}

void backward_dw(const Geom& g, const float* x, const float* dy, float* dw) {
  const int64_t parts = std::min<int64_t>(8, g.N);
  if (parts >= 2 && g.Co * parts * 4 <= g.N * g.P) {
    backward_dw_partials(g, parts, x, dy, dw);
  } else {
    backward_dw_row_blocks(g, x, dy, dw);
  }
}

void backward_db(const Geom& g, const float* dy, float* db) {
  parallel_for(g.Co, 16, [&](int64_t begin, int64_t end) {
    for (int64_t co = begin; co < end; ++co) {
      double s = 0;
      for (int64_t n = 0; n < g.N; ++n) {
        const float* p = dy + (n * g.Co + co) * g.P;
        float part = 0.f;
        for (int64_t i = 0; i < g.P; ++i) part += p[i];
        s += part;
      }
      db[co] += static_cast<float>(s);
    }
  });
}

cpu::WinogradShape winograd_shape(const Geom& g) { return {g.N, g.C, g.H, g.W, g.Co, g.Ho, g.Wo, g.ph, g.pw}; }

void check_params(const Conv2dParams& p) {
  LANCET_CHECK(p.stride_h >= 1 && p.stride_w >= 1 && p.dilation_h >= 1 && p.dilation_w >= 1 && p.pad_h >= 0 &&
                   p.pad_w >= 0 && p.groups >= 1,
               "conv2d: invalid parameters: stride " << p.stride_h << "x" << p.stride_w << ", padding " << p.pad_h
                                                     << "x" << p.pad_w << ", dilation " << p.dilation_h << "x"
                                                     << p.dilation_w << ", groups " << p.groups);
}

// The nchw forward: y overwritten.
void forward_nchw(const Geom& g, bool winograd, const float* x, const float* w, const float* b, float* y) {
  if (winograd) return cpu::winograd_forward(winograd_shape(g), x, w, b, y);
  cpu::BlasSerial serial;
  parallel_for(forward_task_count(g), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) forward_task_run(g, forward_task(g, t), x, w, b, y);
  });
}

std::atomic<bool> g_conv_autotune{false};
std::atomic<bool> g_allow_tf32{false};

}  // namespace

void set_conv_autotune(bool on) { g_conv_autotune.store(on, std::memory_order_relaxed); }
bool conv_autotune() { return g_conv_autotune.load(std::memory_order_relaxed); }
void set_allow_tf32(bool on) { g_allow_tf32.store(on, std::memory_order_relaxed); }
bool allow_tf32() { return g_allow_tf32.load(std::memory_order_relaxed); }

Shape conv2d_output_shape(const Conv2dParams& p, const Shape& x, const Shape& w) {
  check_params(p);
  LANCET_CHECK(x.size() == 4 && w.size() == 4,
               "conv2d: input " << shape_str(x) << " and weight " << shape_str(w) << " must both be 4-D");
  LANCET_CHECK(w[1] * p.groups == x[1], "conv2d: input " << shape_str(x) << " has " << x[1] << " channels but weight "
                                                         << shape_str(w) << " expects " << w[1] << " x groups "
                                                         << p.groups << " = " << w[1] * p.groups);
  LANCET_CHECK(w[0] % p.groups == 0, "conv2d: weight " << shape_str(w) << " has " << w[0]
                                                       << " output channels, not divisible by groups " << p.groups
                                                       << " (input " << shape_str(x) << ")");
  const int64_t ekh = int64_t{p.dilation_h} * (w[2] - 1) + 1, ekw = int64_t{p.dilation_w} * (w[3] - 1) + 1;
  const int64_t hp = x[2] + 2 * int64_t{p.pad_h}, wp = x[3] + 2 * int64_t{p.pad_w};
  LANCET_CHECK(w[2] >= 1 && w[3] >= 1 && ekh <= hp && ekw <= wp, "conv2d: kernel of weight "
                                                                     << shape_str(w) << " (dilated " << ekh << "x"
                                                                     << ekw << ") is larger than the padded input "
                                                                     << shape_str(x) << " (" << hp << "x" << wp << ")");
  return {x[0], w[0], (hp - ekh) / p.stride_h + 1, (wp - ekw) / p.stride_w + 1};
}

void conv2d_forward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y,
                    const Stream& s) {
  LANCET_CUDA_TWIN(x, conv2d_forward(p, x, w, b, y, s));
  const char* op = "conv2d_forward";
  cpu::require_cpu_any_format(op, s, x, {&w, &b, &y});
  cpu::require_defined(op, "weight", w);
  cpu::require_dtype(op, "input", x, DType::f32);
  cpu::require_dtype(op, "weight", w, DType::f32);
  const Geom g = make_geom(p, x.shape(), w.shape());
  cpu::require_shape(op, "output", y, {g.N, g.Co, g.Ho, g.Wo},
                     cpu::desc("input", x) + " and " + cpu::desc("weight", w));
  cpu::require_dtype(op, "output", y, DType::f32);
  cpu::require_same_format(op, "output", y, x, "input");
  if (b.defined()) {
    cpu::require_shape(op, "bias", b, {g.Co}, cpu::desc("weight", w));
    cpu::require_dtype(op, "bias", b, DType::f32);
  }
  if (y.numel() == 0) return;
  add_thread_flops(2 * g.N * g.Co * g.P * g.Cg * g.KH * g.KW);
  const Tensor xn = to_format(x, MemoryFormat::nchw, s), wn = to_format(w, MemoryFormat::nchw, s);
  Tensor yn = y.format() == MemoryFormat::nchw ? y : Tensor::empty(y.shape());
  forward_nchw(g, cpu::winograd_applies(p, x.shape(), w.shape()), xn.data<float>(), wn.data<float>(),
               b.defined() ? b.data<float>() : nullptr, yn.data<float>());
  if (y.format() != MemoryFormat::nchw) convert_format(yn, y, s);
}

void conv2d_backward(const Conv2dParams& p, const Tensor& x, const Tensor& w, const Tensor& dy, Tensor& dx, Tensor& dw,
                     Tensor& db, const Stream& s) {
  LANCET_CUDA_TWIN(x, conv2d_backward(p, x, w, dy, dx, dw, db, s));
  const char* op = "conv2d_backward";
  cpu::require_cpu_any_format(op, s, x, {&w, &dy, &dx, &dw, &db});
  cpu::require_defined(op, "weight", w);
  cpu::require_dtype(op, "input", x, DType::f32);
  cpu::require_dtype(op, "weight", w, DType::f32);
  const Geom g = make_geom(p, x.shape(), w.shape());
  cpu::require_shape(op, "dy", dy, {g.N, g.Co, g.Ho, g.Wo}, cpu::desc("input", x) + " and " + cpu::desc("weight", w));
  cpu::require_dtype(op, "dy", dy, DType::f32);
  cpu::require_same_format(op, "dy", dy, x, "input");
  if (dx.defined()) cpu::require_like(op, "dx", dx, x, "input");
  if (dw.defined()) {  // either format, independently of w's
    cpu::require_shape(op, "dw", dw, w.shape(), cpu::desc("weight", w));
    cpu::require_dtype(op, "dw", dw, DType::f32);
  }
  if (db.defined()) {
    cpu::require_shape(op, "db", db, {g.Co}, cpu::desc("weight", w));
    cpu::require_dtype(op, "db", db, DType::f32);
  }
  if (x.numel() == 0) return;
  const Tensor dyn = to_format(dy, MemoryFormat::nchw, s);
  const float* dyp = dyn.data<float>();
  const bool winograd = cpu::winograd_applies(p, x.shape(), w.shape());
  if (dx.defined()) {
    const Tensor wn = to_format(w, MemoryFormat::nchw, s);
    Tensor dxn = dx.format() == MemoryFormat::nchw ? dx : Tensor::empty(dx.shape());
    if (winograd)
      cpu::winograd_backward_data(winograd_shape(g), wn.data<float>(), dyp, dxn.data<float>());
    else
      backward_dx(g, wn.data<float>(), dyp, dxn.data<float>());
    if (dx.format() != MemoryFormat::nchw) convert_format(dxn, dx, s);
  }
  if (dw.defined()) {
    const Tensor xn = to_format(x, MemoryFormat::nchw, s);
    Tensor dwn = to_format(dw, MemoryFormat::nchw, s);  // accumulates onto dw's values
    if (winograd)
      cpu::winograd_backward_weight(winograd_shape(g), xn.data<float>(), dyp, dwn.data<float>());
    else
      backward_dw(g, xn.data<float>(), dyp, dwn.data<float>());
    if (dw.format() != MemoryFormat::nchw) convert_format(dwn, dw, s);
  }
  if (db.defined()) backward_db(g, dyp, db.data<float>());
}

}  // namespace lancet
