// conv_winograd.cpp — Winograd F(2x2, 3x3) convolution on the CPU (see conv_winograd.h).
//
// With d a 4x4 input tile, g a 3x3 kernel and Y the 2x2 output tile:
//   Y = A^T [(G g G^T) .* (B^T d B)] A
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// Per tile element xi (16 of them) the channel sums are one GEMM: M[xi] = U[xi] V[xi] with
// U[xi] [Cout x Cin] the transformed kernels and V[xi] [Cin x tiles] the transformed tiles.
// The input gradient is the same correlation of dy with the flipped, channel-transposed
// kernels and padding 2 - p. The weight gradient: dU[xi] = sum over tiles (A dY A^T)[xi] V[xi]
// (one GEMM per xi), then dw += G^T dU G.
// Images are processed in chunks that keep V and M near kChunkFloats (at least one image per
// chunk); each chunk runs three parallel phases (transform tiles, 16 GEMMs, transform back),
// each split by shape only. Scratch slots: U / dU, V and M / (A dY A^T) are slots 0-2 of the
// calling thread; the tasks use slot 3 only.
#include "kernels/conv_winograd.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu_util.h"

namespace lancet::cpu {
namespace {

constexpr int64_t kChunkFloats = int64_t{1} << 21;

// The 16 per-element matrices (U, V, M and their gradients) sit `xi_stride(n)` floats apart
// for n floats each: the extra cache line keeps their 16 streams out of one cache set (with
// power-of-two sizes they would be a multiple of 4 KiB apart and thrash L1).
int64_t xi_stride(int64_t n) { return n + 16; }

// Row-wise 1-D transforms: each output row is a combination of input rows, elementwise over
// n entries (standalone functions with restrict pointers so that they vectorise).
void g_rows(const float* __restrict k0, const float* __restrict k1, const float* __restrict k2, float* __restrict o0,
            float* __restrict o1, float* __restrict o2, float* __restrict o3, int64_t n) {  // G k
  for (int64_t i = 0; i < n; ++i) {
    const float a = k0[i], b = k1[i], c = k2[i];
    o0[i] = a, o1[i] = 0.5f * (a + b + c), o2[i] = 0.5f * (a - b + c), o3[i] = c;
  }
}
void gt_rows(const float* __restrict u0, const float* __restrict u1, const float* __restrict u2,
             const float* __restrict u3, float* __restrict o0, float* __restrict o1, float* __restrict o2,
             int64_t n) {  // G^T u
  for (int64_t i = 0; i < n; ++i) {
    const float a = u0[i], b = u1[i], c = u2[i], d = u3[i];
    o0[i] = a + 0.5f * (b + c), o1[i] = 0.5f * (b - c), o2[i] = 0.5f * (b + c) + d;
  }
}
void bt_rows(const float* __restrict d0, const float* __restrict d1, const float* __restrict d2,
             const float* __restrict d3, float* __restrict o0, float* __restrict o1, float* __restrict o2,
             float* __restrict o3, int64_t n) {  // B^T d
  for (int64_t i = 0; i < n; ++i) {
    const float a = d0[i], b = d1[i], c = d2[i], d = d3[i];
    o0[i] = a - c, o1[i] = b + c, o2[i] = c - b, o3[i] = b - d;
  }
}
void a_rows(const float* __restrict y0, const float* __restrict y1, float* __restrict o0, float* __restrict o1,
            float* __restrict o2, float* __restrict o3, int64_t n) {  // A y
  for (int64_t i = 0; i < n; ++i) {
    const float a = y0[i], b = y1[i];
    o0[i] = a, o1[i] = a + b, o2[i] = a - b, o3[i] = -b;
  }
}

// dst[i] = src[i * stride], i < n.
void gather_strided(const float* __restrict src, int64_t stride, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}

// U[xi][o][i] = (G k G^T)[xi] with k = w[o][i] (forward) or flip(w[i][o]) (input gradient,
// where o runs over the input channels of w and i over its output channels). Works on whole
// rows over i (a [9][I] staging copy per o) so the arithmetic vectorises.
void transform_kernels(const float* w, int64_t Co, int64_t C, bool flip_transpose, float* U) {
  const int64_t O = flip_transpose ? C : Co, I = flip_transpose ? Co : C, su = xi_stride(Co * C);
  parallel_for(O, 4, [&](int64_t begin, int64_t end) {
    float* k = scratch(3, static_cast<size_t>(9 + 12) * I);  // k [9][I], then G k: t [4][3][I]
    float* t = k + 9 * I;
    for (int64_t o = begin; o < end; ++o) {
      if (flip_transpose) {
        for (int e = 0; e < 9; ++e) gather_strided(w + o * 9 + 8 - e, C * 9, k + e * I, I);
      } else {
        for (int e = 0; e < 9; ++e) gather_strided(w + o * C * 9 + e, 9, k + e * I, I);
      }
      for (int q = 0; q < 3; ++q)  // t[a][q] = sum_p G[a][p] k[p][q]
        g_rows(k + q * I, k + (3 + q) * I, k + (6 + q) * I, t + q * I, t + (3 + q) * I, t + (6 + q) * I,
               t + (9 + q) * I, I);
      for (int a = 0; a < 4; ++a)  // U[a][b] = sum_q G[b][q] t[a][q]
        g_rows(t + 3 * a * I, t + (3 * a + 1) * I, t + (3 * a + 2) * I, U + 4 * a * su + o * I,
               U + (4 * a + 1) * su + o * I, U + (4 * a + 2) * su + o * I, U + (4 * a + 3) * su + o * I, I);
    }
  });
}

// dw[co][c] += G^T dU[.][co][c] G, on whole rows over c.
void accumulate_weight_grad(const float* dU, int64_t Co, int64_t C, float* dw) {
  const int64_t su = xi_stride(Co * C);
  parallel_for(Co, 4, [&](int64_t begin, int64_t end) {
    float* t = scratch(3, static_cast<size_t>(12 + 9) * C);  // t [4][3][C] = dU G, then k [9][C]
    float* k = t + 12 * C;
    for (int64_t co = begin; co < end; ++co) {
      for (int a = 0; a < 4; ++a)  // t[a][q] = sum_b dU[a][b] G[b][q]
        gt_rows(dU + 4 * a * su + co * C, dU + (4 * a + 1) * su + co * C, dU + (4 * a + 2) * su + co * C,
                dU + (4 * a + 3) * su + co * C, t + 3 * a * C, t + (3 * a + 1) * C, t + (3 * a + 2) * C, C);
      for (int q = 0; q < 3; ++q)  // k[p][q] = sum_a G[a][p] t[a][q]
        gt_rows(t + q * C, t + (3 + q) * C, t + (6 + q) * C, t + (9 + q) * C, k + q * C, k + (3 + q) * C,
                k + (6 + q) * C, C);
      float* dst = dw + co * C * 9;
      for (int64_t c = 0; c < C; ++c)
        for (int e = 0; e < 9; ++e) dst[c * 9 + e] += k[e * C + c];
    }
  });
}

// Tiles of an output plane. The transforms read input rows straight from the tensor: rows
// outside the plane read a zero row, and the vertical pass writes columns [c0, c1) of
// zero-bordered temporary rows (padding pad on the left; a negative padding crops). Each task
// zeroes its workspace once; the borders stay zero because only [c0, c1) is ever written.
struct Tiling {
  int64_t th, tw;
  int64_t per_image() const { return th * tw; }
  int64_t workspace() const { return 6 * (2 * tw + 2) + 8 * tw; }  // floats per thread
};
Tiling tiling(int64_t Ho, int64_t Wo) { return {(Ho + 1) / 2, (Wo + 1) / 2}; }

// dst[xi * stride + tile] = (B^T d B)[xi] for the tiles of one input plane x [H x W].
void input_tiles(const float* x, int64_t H, int64_t W, int64_t pad_h, int64_t pad_w, const Tiling& t, float* dst,
                 int64_t stride, float* work) {
  const int64_t Wp = 2 * t.tw + 2;
  float* v[4] = {work, work + Wp, work + 2 * Wp, work + 3 * Wp};
  const float* zero = work + 4 * Wp;
  const int64_t c0 = std::max<int64_t>(0, pad_w), c1 = std::min(Wp, W + pad_w);  // columns holding x
  for (int64_t ty = 0; ty < t.th; ++ty) {
    const float* r[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t ih = 2 * ty + j - pad_h;
      r[j] = ih >= 0 && ih < H ? x + ih * W + (c0 - pad_w) : zero;
    }
    bt_rows(r[0], r[1], r[2], r[3], v[0] + c0, v[1] + c0, v[2] + c0, v[3] + c0, c1 - c0);
    for (int a = 0; a < 4; ++a) {
      const float* q = v[a];
      float* d0 = dst + (4 * a) * stride + ty * t.tw;
      float *d1 = d0 + stride, *d2 = d1 + stride, *d3 = d2 + stride;
      for (int64_t tx = 0; tx < t.tw; ++tx) {
        const float q0 = q[2 * tx], q1 = q[2 * tx + 1], q2 = q[2 * tx + 2], q3 = q[2 * tx + 3];
        d0[tx] = q0 - q2, d1[tx] = q1 + q2, d2[tx] = q2 - q1, d3[tx] = q1 - q3;
      }
    }
  }
}

// out [Ho x Wo] = (A^T m A) + bias for the tiles m[xi * stride + tile] of one plane.
void output_tiles(const float* m, int64_t stride, const Tiling& t, float bias, float* out, int64_t Ho, int64_t Wo,
                  float* work) {
  float* s[8];
  for (int k = 0; k < 8; ++k) s[k] = work + k * t.tw;  // s[2 * b + r]: row r of A^T m, column b
  const int64_t pairs = Wo / 2;                        // tiles with both output columns inside
  for (int64_t ty = 0; ty < t.th; ++ty) {
    for (int b = 0; b < 4; ++b) {
      const float *z0 = m + b * stride + ty * t.tw, *z1 = z0 + 4 * stride, *z2 = z1 + 4 * stride, *z3 = z2 + 4 * stride;
      float *s0 = s[2 * b], *s1 = s[2 * b + 1];
      for (int64_t tx = 0; tx < t.tw; ++tx) s0[tx] = z0[tx] + z1[tx] + z2[tx], s1[tx] = z1[tx] - z2[tx] - z3[tx];
    }
    for (int r = 0; r < 2 && 2 * ty + r < Ho; ++r) {
      float* row = out + (2 * ty + r) * Wo;
      const float *c0 = s[r], *c1 = s[2 + r], *c2 = s[4 + r], *c3 = s[6 + r];
      for (int64_t tx = 0; tx < pairs; ++tx) {
        row[2 * tx] = c0[tx] + c1[tx] + c2[tx] + bias;
        row[2 * tx + 1] = c1[tx] - c2[tx] - c3[tx] + bias;
      }
      if (Wo % 2) row[2 * pairs] = c0[pairs] + c1[pairs] + c2[pairs] + bias;
    }
  }
}

// dst[xi * stride + tile] = (A g A^T)[xi] for the 2x2 tiles of one output-gradient plane g
// [Ho x Wo]; outputs beyond an odd size count as zero.
void gradient_tiles(const float* g, int64_t Ho, int64_t Wo, const Tiling& t, float* dst, int64_t stride, float* work) {
  const int64_t Wg = 2 * t.tw;
  float* p[4] = {work, work + Wg, work + 2 * Wg, work + 3 * Wg};
  const float* zero = work + 4 * Wg;
  for (int64_t ty = 0; ty < t.th; ++ty) {
    const float* y0 = g + 2 * ty * Wo;
    a_rows(y0, 2 * ty + 1 < Ho ? y0 + Wo : zero, p[0], p[1], p[2], p[3], Wo);
    for (int a = 0; a < 4; ++a) {
      const float* q = p[a];
      float* d0 = dst + (4 * a) * stride + ty * t.tw;
      float *d1 = d0 + stride, *d2 = d1 + stride, *d3 = d2 + stride;
      for (int64_t tx = 0; tx < t.tw; ++tx) {
        const float q0 = q[2 * tx], q1 = q[2 * tx + 1];
        d0[tx] = q0, d1[tx] = q0 + q1, d2[tx] = q0 - q1, d3[tx] = -q1;
      }
    }
  }
}

// Input tiles of images [n0, n1) into V [16][C][nt], parallel over (channel, image) planes.
void transform_inputs(const float* x, int64_t n0, int64_t n1, int64_t C, int64_t H, int64_t W, int64_t pad_h,
                      int64_t pad_w, const Tiling& t, float* V) {
  const int64_t nt = (n1 - n0) * t.per_image();
  parallel_for((n1 - n0) * C, 4, [&](int64_t begin, int64_t end) {
    float* work = scratch(3, static_cast<size_t>(t.workspace()));
    std::fill(work, work + t.workspace(), 0.f);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t c = q / (n1 - n0), n = n0 + q % (n1 - n0);  // images inner: V rows fill sequentially
      input_tiles(x + (n * C + c) * H * W, H, W, pad_h, pad_w, t, V + c * nt + (n - n0) * t.per_image(),
                  xi_stride(C * nt), work);
    }
  });
}

int64_t images_per_chunk(int64_t N, int64_t channels, const Tiling& t) {
  return std::max<int64_t>(1, std::min(N, kChunkFloats / (16 * channels * t.per_image())));
}

// out [N, Co, Ho, Wo] = correlation of in [N, Ci, Hi, Wi] (padding pad_h, pad_w) with the
// kernels transformed into U [16][Co][Ci], plus bias (may be null).
void correlate(const float* in, int64_t N, int64_t Ci, int64_t Hi, int64_t Wi, const float* U, int64_t Co,
               int64_t pad_h, int64_t pad_w, const float* bias, float* out, int64_t Ho, int64_t Wo) {
  const Tiling t = tiling(Ho, Wo);
  const int64_t T = t.per_image(), nb = images_per_chunk(N, Ci + Co, t);
  float* V = scratch(1, static_cast<size_t>(16 * xi_stride(Ci * nb * T)));
  float* M = scratch(2, static_cast<size_t>(16 * xi_stride(Co * nb * T)));
  const int64_t su = xi_stride(Co * Ci);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t n1 = std::min(N, n0 + nb), nt = (n1 - n0) * T, sv = xi_stride(Ci * nt), sm = xi_stride(Co * nt);
    transform_inputs(in, n0, n1, Ci, Hi, Wi, pad_h, pad_w, t, V);
    {
      BlasSerial serial;
      parallel_for(16, 1, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e)
          sgemm(false, false, int(Co), int(nt), int(Ci), 1.f, U + e * su, int(Ci), V + e * sv, int(nt), 0.f, M + e * sm,
                int(nt));
      });
    }
    parallel_for((n1 - n0) * Co, 4, [&](int64_t begin, int64_t end) {
      float* work = scratch(3, static_cast<size_t>(t.workspace()));
      for (int64_t q = begin; q < end; ++q) {
        const int64_t co = q / (n1 - n0), n = n0 + q % (n1 - n0);  // images inner: M rows read sequentially
        output_tiles(M + co * nt + (n - n0) * T, sm, t, bias ? bias[co] : 0.f, out + (n * Co + co) * Ho * Wo, Ho, Wo,
                     work);
      }
    });
  }
}

}  // namespace

bool winograd_applies(const Conv2dParams& p, const Shape& x, const Shape& w) {
  if (w[2] != 3 || w[3] != 3 || p.stride_h != 1 || p.stride_w != 1 || p.dilation_h != 1 || p.dilation_w != 1 ||
      p.groups != 1 || x[1] < 16 || w[0] < 16)  // few channels: 16 tiny GEMMs lose to im2col's one
    return false;
  // Per (input, output) channel pair Winograd saves N * (9 P - 16 T) multiply-adds over im2col
  // and pays a fixed ~300-800 (measured) for the kernel transforms; tiny planes at small
  // batches (MedicalCNN's 2x2 stage at batch 32: 640) stay on im2col.
  const int64_t Ho = x[2] + 2 * p.pad_h - 2, Wo = x[3] + 2 * p.pad_w - 2;
  const int64_t P = Ho * Wo, T = ((Ho + 1) / 2) * ((Wo + 1) / 2);
  return x[0] * (9 * P - 16 * T) >= 1024;
}

void winograd_forward(const WinogradShape& s, const float* x, const float* w, const float* b, float* y) {
  float* U = scratch(0, static_cast<size_t>(16 * xi_stride(s.Co * s.C)));
  transform_kernels(w, s.Co, s.C, false, U);
  correlate(x, s.N, s.C, s.H, s.W, U, s.Co, s.ph, s.pw, b, y, s.Ho, s.Wo);
}

void winograd_backward_data(const WinogradShape& s, const float* w, const float* dy, float* dx) {
  float* U = scratch(0, static_cast<size_t>(16 * xi_stride(s.Co * s.C)));
  transform_kernels(w, s.Co, s.C, true, U);
  correlate(dy, s.N, s.Co, s.Ho, s.Wo, U, s.C, 2 - s.ph, 2 - s.pw, nullptr, dx, s.H, s.W);
}

void winograd_backward_weight(const WinogradShape& s, const float* x, const float* dy, float* dw) {
  const Tiling t = tiling(s.Ho, s.Wo);
  const int64_t T = t.per_image(), nb = images_per_chunk(s.N, s.C + s.Co, t);
  const int64_t su = xi_stride(s.Co * s.C);
  float* dU = scratch(0, static_cast<size_t>(16 * su));
  float* V = scratch(1, static_cast<size_t>(16 * xi_stride(s.C * nb * T)));
  float* G = scratch(2, static_cast<size_t>(16 * xi_stride(s.Co * nb * T)));  // (A dY A^T) per tile
  for (int64_t n0 = 0; n0 < s.N; n0 += nb) {
    const int64_t n1 = std::min(s.N, n0 + nb), nt = (n1 - n0) * T, sv = xi_stride(s.C * nt), sg = xi_stride(s.Co * nt);
    transform_inputs(x, n0, n1, s.C, s.H, s.W, s.ph, s.pw, t, V);
    parallel_for((n1 - n0) * s.Co, 4, [&](int64_t begin, int64_t end) {
      float* work = scratch(3, static_cast<size_t>(t.workspace()));
      std::fill(work, work + t.workspace(), 0.f);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t co = q / (n1 - n0), n = n0 + q % (n1 - n0);
        gradient_tiles(dy + (n * s.Co + co) * s.Ho * s.Wo, s.Ho, s.Wo, t, G + co * nt + (n - n0) * T, sg, work);
      }
    });
    BlasSerial serial;
    parallel_for(16, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        sgemm(false, true, int(s.Co), int(s.C), int(nt), 1.f, G + e * sg, int(nt), V + e * sv, int(nt),
              n0 == 0 ? 0.f : 1.f, dU + e * su, int(s.C));
    });
  }
  accumulate_weight_grad(dU, s.Co, s.C, dw);
}

}  // namespace lancet::cpu
