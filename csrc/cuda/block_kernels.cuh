// Index functors of the CUDA dense-block and tail kernels (launched by for_each, launch.cuh).
//
// Every activation is channels_last, i.e. a row-major matrix [rows = N*H*W, ld] whose columns are
// channels; a functor over a [rows, width] range decodes i -> (r = i / width, j = i % width), so
// consecutive threads touch consecutive channels of one row (coalesced). Math is in acc_t (float
// for float/half/bfloat16, double for double) with the folded-BN algebra of common/bn_math.h; values
// are rounded to the data type T once, where they are stored.
#pragma once

#include "common/bn_math.h"
#include "common/nonfinite.h"
#include "cuda/launch.cuh"

namespace dnf::DNF_CUDA_NS {

// a = gamma*invstd, b = beta - mean*a, invstd = 1/sqrt(var + eps) per channel. With gamma == nullptr
// only invstd is written.
template <typename acc_t>
struct FoldBn {
  const acc_t *gamma, *beta, *mean, *var;
  double eps;
  acc_t *a, *b, *invstd;
  C10_HOST_DEVICE void operator()(int64_t j) const {
    const acc_t is = invstd_from_var<acc_t>(var[j], eps);
    invstd[j] = is;
    if (gamma != nullptr) fold_bn<acc_t>(gamma[j], beta[j], mean[j], is, a[j], b[j]);
  }
};

// out[r, j] = relu(a[j]*x[r, j] + b[j]) for j < width; x and out may alias (in place). With per-channel
// slopes (a LeakyReLU / PReLU block, dense_block_act_*): leaky(a[j]*x + b[j], slope[j]) (common/bn_math.h).
template <typename T, typename acc_t>
struct BnReluApply {
  const T* x;
  int64_t ldx;
  T* out;
  int64_t ldo, width;
  const acc_t *a, *b;
  const acc_t* slope = nullptr;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t r, j;
    divmod(i, width, r, j);
    const acc_t z = a[j] * static_cast<acc_t>(x[r * ldx + j]) + b[j];
    out[r * ldo + j] = static_cast<T>(slope == nullptr ? relu<acc_t>(z) : leaky<acc_t>(z, slope[j]));
  }
};

// Element (r, channel ch0 + j) of a bool dropout mask [N, C, H, W] of any strides (keep = true).
struct MaskView {
  const bool* p = nullptr;
  int64_t sN = 0, sC = 0, sH = 0, sW = 0, HW = 1, W = 1, ch0 = 0;
  C10_HOST_DEVICE bool keep(int64_t r, int64_t j) const {
    int64_t n, hw, h, w;
    divmod(r, HW, n, hw);
    divmod(hw, W, h, w);
    return p[n * sN + (ch0 + j) * sC + h * sH + w * sW];
  }
};

// Writes a layer's k new channels into the block buffer: dst[r, c0 + j] = src[r, j] (times the
// dropout mask / (1 - p), as F.dropout computes it, when a mask is given).
template <typename T, typename acc_t>
struct StoreNewFeatures {
  const T* src;
  T* dst;
  int64_t ld, c0, k;
  MaskView mask;
  acc_t inv_keep;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t r, j;
    divmod(i, k, r, j);
    acc_t v = static_cast<acc_t>(src[i]);
    if (mask.p != nullptr) v = mask.keep(r, j) ? v * inv_keep : acc_t(0);
    dst[r * ld + c0 + j] = static_cast<T>(v);
  }
};

// Gradient of a layer's conv2 output: dout[r, j] = G[r, c0 + j] (times mask / (1 - p)), in T.
template <typename T, typename acc_t>
struct GradOfNewFeatures {
  const acc_t* G;
  T* dout;
  int64_t ld, c0, k;
  MaskView mask;
  acc_t inv_keep;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t r, j;
    divmod(i, k, r, j);
    acc_t v = G[r * ld + c0 + j];
    if (mask.p != nullptr) v = mask.keep(r, j) ? v * inv_keep : acc_t(0);
    dout[i] = static_cast<T>(v);
  }
};

// BN2 + ReLU backward sums of a [rows, width] bottleneck: dz = dV through the ReLU of V (relu_grad:
// NaN passes, as threshold_backward); s0 += dz, s1 += dz * xhat2. kAct (LeakyReLU / PReLU, three sums):
// dz and the slope's term s2 follow the pre-activation z = a*Y + b (torch's rule, as the CPU kernels).
template <typename T, typename acc_t, bool kAct = false>
struct Bn2BackwardTerm {
  const T *V, *dV, *Y;
  const acc_t *mean, *invstd;
  int64_t width;
  const acc_t *a = nullptr, *b = nullptr, *slope = nullptr;  // kAct only
  C10_HOST_DEVICE void operator()(int64_t r, int64_t j, acc_t* s) const {
    const int64_t i = r * width + j;
    const acc_t y = static_cast<acc_t>(Y[i]), dv = static_cast<acc_t>(dV[i]);
    acc_t dz;
    if constexpr (kAct) {
      const acc_t z = a[j] * y + b[j];
      dz = leaky_grad<acc_t>(z, slope[j], dv);
      s[2] += leaky_slope_grad<acc_t>(z, dv);
    } else {
      dz = relu_grad<acc_t>(static_cast<acc_t>(V[i]), dv);
    }
    s[0] += dz;
    s[1] += dz * (y - mean[j]) * invstd[j];
  }
};

// Per-channel epilogue of a BN backward reduction, sums = [2, width] (sum dz, sum dz*xhat):
// dbeta, dgamma; m = [2, width] the training-mode mean terms (zero in eval) when m != nullptr;
// S1 += gamma*dbeta, S2 += gamma*dgamma (the merged BN1 backward scalars) when S1 != nullptr.
template <typename acc_t>
struct BnGradEpilogue {
  const acc_t* sums;
  int64_t width, rows;
  bool training;
  acc_t *dbeta, *dgamma, *m;
  const acc_t* gamma;
  acc_t *S1, *S2;
  C10_HOST_DEVICE void operator()(int64_t j) const {
    const acc_t s0 = sums[j], s1 = sums[width + j];
    dbeta[j] = s0;
    dgamma[j] = s1;
    if (m != nullptr) {
      m[j] = training ? s0 / static_cast<acc_t>(rows) : acc_t(0);
      m[width + j] = training ? s1 / static_cast<acc_t>(rows) : acc_t(0);
    }
    if (S1 != nullptr) {
      S1[j] += gamma[j] * s0;
      S2[j] += gamma[j] * s1;
    }
  }
};

// In place dV -> dY: the full BN2 + ReLU backward of one element (eval: a*dz, common/nonfinite.h). With
// slopes (b and slope set): the LeakyReLU / PReLU gradient by the pre-activation z = a*Y + b.
template <typename T, typename acc_t>
struct Bn2BackwardApply {
  const T *V, *Y;
  T* dV;
  const acc_t *mean, *invstd, *a, *m;
  int64_t width;
  bool training;
  const acc_t *b = nullptr, *slope = nullptr;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t r, j;
    divmod(i, width, r, j);
    const acc_t y = static_cast<acc_t>(Y[i]), dv = static_cast<acc_t>(dV[i]);
    const acc_t dz = slope == nullptr ? relu_grad<acc_t>(static_cast<acc_t>(V[i]), dv)
                                      : leaky_grad<acc_t>(a[j] * y + b[j], slope[j], dv);
    const acc_t xhat = (y - mean[j]) * invstd[j];
    dV[i] = static_cast<T>(bn_backward<acc_t>(dz, xhat, a[j], m[j], m[width + j], training));
  }
};

// BN1 + ReLU backward of one layer over its input columns [0, c): dU is the gradient of
// U = relu(a*X + b) ([rows, c]); the ReLU mask is recomputed from X exactly as the forward rounded
// U. Adds a*d to the block gradient buffer G (each (r, j) is visited once) and accumulates
// s0 += d, s1 += d * xhat. kAct (LeakyReLU / PReLU, three sums): d and the slope's term s2 follow the
// pre-activation z = a*X + b, in acc_t as the prologue computed it (as the CPU kernels).
template <typename T, typename acc_t, bool kAct = false>
struct Bn1BackwardTerm {
  const T* X;
  int64_t ld;
  const T* dU;
  int64_t c;
  const acc_t *a, *b, *mean, *invstd;
  acc_t* G;
  const acc_t* slope = nullptr;  // kAct only
  C10_HOST_DEVICE void operator()(int64_t r, int64_t j, acc_t* s) const {
    const acc_t x = static_cast<acc_t>(X[r * ld + j]);
    const acc_t du = static_cast<acc_t>(dU[r * c + j]);
    acc_t d;
    if constexpr (kAct) {
      const acc_t z = a[j] * x + b[j];
      d = leaky_grad<acc_t>(z, slope[j], du);
      s[2] += leaky_slope_grad<acc_t>(z, du);
    } else {
      const T u = static_cast<T>(relu<acc_t>(a[j] * x + b[j]));
      d = relu_grad<acc_t>(static_cast<acc_t>(u), du);
    }
    G[r * ld + j] += a[j] * d;
    s[0] += d;
    s[1] += d * (x - mean[j]) * invstd[j];
  }
};

// Merged BN1 backward of every reader of columns [c0, c0 + width), once all of them are done:
// G -= invstd/n * (S1 + xhat*S2).
template <typename T, typename acc_t>
struct FinalizeGrad {
  acc_t* G;
  const T* X;
  int64_t ld, c0, width, rows;
  const acc_t *mean, *invstd, *S1, *S2;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t r, jj;
    divmod(i, width, r, jj);
    const int64_t j = c0 + jj, e = r * ld + j;
    const acc_t xhat = (static_cast<acc_t>(X[e]) - mean[j]) * invstd[j];
    G[e] = finalize_grad<acc_t>(G[e], xhat, invstd[j] / static_cast<acc_t>(rows), S1[j], S2[j]);
  }
};

// --- tails: transition (BN-ReLU-conv1x1-avgpool2) and final norm (BN-ReLU-global avg pool) --------

// 2x2 pool over [H, W]; a 3-D transition pools 2x2x2 (kd = 2) over [D, H, W].
struct PoolGeometry {
  int64_t H, W, H2, W2;
  int64_t D = 1, D2 = 1, kd = 1;
};

// The prologue scale of a tail reader with an optional SE gate g [N, C] (docs/design.md §5): the reader
// normalises y = g*x, so sample n, channel j uses relu(ag*x + b) with ag = a*g (stride C), or the BN's
// own a (stride 0) when ungated; gate() is g (1 when ungated).
template <typename acc_t>
struct GatedScale {
  const acc_t* ag;
  const acc_t* g;
  int64_t stride;
  C10_HOST_DEVICE acc_t scale(int64_t n, int64_t j) const { return ag[n * stride + j]; }
  C10_HOST_DEVICE acc_t gate(int64_t n, int64_t j) const { return g == nullptr ? acc_t(1) : g[n * stride + j]; }
};

// ag[n, j] = a[j] * g[n, j].
template <typename acc_t>
struct ScaleByGate {
  const acc_t *a, *g;
  int64_t C;
  acc_t* ag;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t n, j;
    divmod(i, C, n, j);
    ag[i] = a[j] * g[i];
  }
};

// P[q, j] = 2x2(x2) average (floor mode) of relu(a*x + b) around output position q.
template <typename T, typename acc_t>
struct PoolBnRelu {
  const T* X;
  int64_t C;
  PoolGeometry g;
  GatedScale<acc_t> a;
  const acc_t* b;
  T* P;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t q, j, nd, rem, oh, ow, n, od;
    divmod(i, C, q, j);
    divmod(q, g.H2 * g.W2, nd, rem);
    divmod(rem, g.W2, oh, ow);
    divmod(nd, g.D2, n, od);
    const acc_t aj = a.scale(n, j), bj = b[j];
    acc_t s = acc_t(0);
    for (int64_t dz = 0; dz < g.kd; ++dz) {
      const int64_t base = ((n * g.D + g.kd * od + dz) * g.H + 2 * oh) * g.W + 2 * ow;
      s += relu<acc_t>(aj * static_cast<acc_t>(X[base * C + j]) + bj) +
           relu<acc_t>(aj * static_cast<acc_t>(X[(base + 1) * C + j]) + bj) +
           relu<acc_t>(aj * static_cast<acc_t>(X[(base + g.W) * C + j]) + bj) +
           relu<acc_t>(aj * static_cast<acc_t>(X[(base + g.W + 1) * C + j]) + bj);
    }
    P[i] = static_cast<T>(s / acc_t(4 * g.kd));
  }
};

// out[n, j] = mean over the HW positions of relu(a*x + b).
template <typename T, typename acc_t>
struct NormReluPool {
  const T* X;
  int64_t HW, C;
  GatedScale<acc_t> a;
  const acc_t* b;
  T* out;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t n, j;
    divmod(i, C, n, j);
    const T* x = X + n * HW * C + j;
    const acc_t aj = a.scale(n, j);
    acc_t s = acc_t(0);
    for (int64_t p = 0; p < HW; ++p) s += relu<acc_t>(aj * static_cast<acc_t>(x[p * C]) + b[j]);
    out[i] = static_cast<T>(s / static_cast<acc_t>(HW));
  }
};

// Gradient w.r.t. the ReLU output of the final norm: dO[n, j] / HW.
template <typename T, typename acc_t>
struct GlobalPoolUp {
  const T* dO;
  int64_t HW, C;
  C10_HOST_DEVICE acc_t operator()(int64_t r, int64_t j) const {
    int64_t n, p;
    divmod(r, HW, n, p);
    return static_cast<acc_t>(dO[n * C + j]) / static_cast<acc_t>(HW);
  }
};

// Gradient w.r.t. the ReLU output of the transition: dP[pooled position, j] / 4, zero for the rows
// and columns a floor-mode 2x2 pool drops.
template <typename T, typename acc_t>
struct AvgPool2Up {
  const T* dP;
  PoolGeometry g;
  int64_t C;
  C10_HOST_DEVICE acc_t operator()(int64_t r, int64_t j) const {
    int64_t nd, hw, h, w, n, d;
    divmod(r, g.H * g.W, nd, hw);
    divmod(hw, g.W, h, w);
    divmod(nd, g.D, n, d);
    if (h >= 2 * g.H2 || w >= 2 * g.W2 || d >= g.kd * g.D2) return acc_t(0);
    // d / kd, h / 2, w / 2 of non-negative values: shifts (kd is 1 or 2)
    return static_cast<acc_t>(dP[(((n * g.D2 + (d >> (g.kd - 1))) * g.H2 + (h >> 1)) * g.W2 + (w >> 1)) * C + j]) /
           acc_t(4 * g.kd);
  }
};

// BN + ReLU backward of a tail reader, one element (row r of HW-row samples, channel j): the BN input
// is y = g*x (gs), so d = up through the ReLU of ag*x + b (relu_grad rule), xhat = (g*x - mean)*invstd.
template <typename T, typename acc_t, class Up>
struct TailElement {
  const T* X;
  int64_t C, HW;
  GatedScale<acc_t> gs;
  const acc_t *b, *mean, *invstd;
  Up up;
  // (x, g, d, xhat) of element (r, j).
  C10_HOST_DEVICE void eval(int64_t r, int64_t j, acc_t& x, acc_t& g, acc_t& d, acc_t& xhat) const {
    int64_t n, p;
    divmod(r, HW, n, p);
    x = static_cast<acc_t>(X[r * C + j]);
    g = gs.gate(n, j);
    d = bn_relu_grad<acc_t>(gs.scale(n, j) * x + b[j], up(r, j));
    xhat = (g * x - mean[j]) * invstd[j];
  }
};

// s0 += d, s1 += d*xhat (so a dropped pixel adds 0*xhat to dgamma, as torch does).
template <typename T, typename acc_t, class Up>
struct TailBackwardTerm {
  TailElement<T, acc_t, Up> e;
  C10_HOST_DEVICE void operator()(int64_t r, int64_t j, acc_t* s) const {
    acc_t x, g, d, xhat;
    e.eval(r, j, x, g, d, xhat);
    s[0] += d;
    s[1] += d * xhat;
  }
};

// dX = g * dy, dy the BN backward of y (eval: a*d, common/nonfinite.h); a: the BN's own scale.
template <typename T, typename acc_t, class Up>
struct TailBackwardApply {
  TailElement<T, acc_t, Up> e;
  const acc_t *a, *m;
  T* dX;
  bool training;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t r, j;
    divmod(i, e.C, r, j);
    acc_t x, g, d, xhat;
    e.eval(r, j, x, g, d, xhat);
    dX[i] = static_cast<T>(g * bn_backward<acc_t>(d, xhat, a[j], m[j], m[e.C + j], training));
  }
};

// Gate gradient of a gated tail reader, as a column reduction over the HW rows of each sample with
// N*C columns (column = n*C + j): s0 += x * dy.
template <typename T, typename acc_t, class Up>
struct GateGradTerm {
  TailElement<T, acc_t, Up> e;
  const acc_t *a, *m;
  bool training;
  C10_HOST_DEVICE void operator()(int64_t p, int64_t col, acc_t* s) const {
    int64_t n, j;
    divmod(col, e.C, n, j);
    acc_t x, g, d, xhat;
    e.eval(n * e.HW + p, j, x, g, d, xhat);
    s[0] += x * bn_backward<acc_t>(d, xhat, a[j], m[j], m[e.C + j], training);
  }
};

// The pixels a floor-mode 2x2(x2) pool drops, numbered per sample: q in [0, per_sample()) -> the pixel's
// offset in its sample, (d*H + h)*W + w. Three runs, in this order: the last column of an odd W in the
// rows the pool reads (d < Dr, h < Hr, w >= Wr), the last row of an odd H (d < Dr, h >= Hr), the last
// plane of an odd D (d >= Dr). Dr, Hr, Wr: the extent the pool reads.
struct DroppedPixels {
  int64_t D, H, W, Dr, Hr, Wr;
  C10_HOST_DEVICE int64_t per_sample() const { return D * H * W - Dr * Hr * Wr; }
  C10_HOST_DEVICE int64_t pixel(int64_t q) const {
    const int64_t cols = Dr * Hr * (W - Wr);
    if (q < cols) {
      int64_t dh, w, d, h;
      divmod(q, W - Wr, dh, w);
      divmod(dh, Hr, d, h);
      return (d * H + h) * W + Wr + w;
    }
    q -= cols;
    const int64_t rows = Dr * (H - Hr) * W;
    if (q < rows) {
      int64_t dh, w, d, h;
      divmod(q, W, dh, w);
      divmod(dh, H - Hr, d, h);
      return (d * H + Hr + h) * W + w;
    }
    return Dr * H * W + (q - rows);
  }
};

// Transition dWc NaN rule (common/nonfinite.h) as a column reduction over the dropped pixels (rows
// r = n*per_sample + q): s0 counts the pixels of channel j whose relu(bn(x)) is not finite. Every
// (chunk, channel) item is its own thread, so an odd-H/W transition no longer walks N*D*H rows per channel
// in one thread.
template <typename T, typename acc_t>
struct DroppedNonfiniteTerm {
  const T* X;
  DroppedPixels px;
  int64_t C;
  GatedScale<acc_t> a;
  const acc_t* b;
  C10_HOST_DEVICE void operator()(int64_t r, int64_t j, acc_t* s) const {
    int64_t n, q;
    divmod(r, px.per_sample(), n, q);
    const int64_t pix = n * px.D * px.H * px.W + px.pixel(q);
    const acc_t v = relu<acc_t>(a.scale(n, j) * static_cast<acc_t>(X[pix * C + j]) + b[j]);
    if (dropped_pixel_poisons_dwc<acc_t>(v)) s[0] += acc_t(1);
  }
};

// dW[o, j] = NaN for the columns j of a [Cout, C] weight gradient whose count is not zero.
template <typename T, typename acc_t>
struct PoisonColumns {
  const acc_t* count;
  int64_t C;
  T* dW;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t o, j;
    divmod(i, C, o, j);
    if (count[j] != acc_t(0)) dW[i] = static_cast<T>(NAN);
  }
};

}  // namespace dnf::DNF_CUDA_NS
