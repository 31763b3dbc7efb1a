// One GRU layer as XLA FFI custom calls: the library's default GRU (``reset_after=True``, the
// cuDNN/PyTorch form, no layer norm), a hand-fused training forward and backward and an inference
// forward around oneDNN's JIT GEMM (`dnnl_sgemm`); in bfloat16 compute, the same fused loops
// around its bfloat16 GEMM (the bfloat16 path, further down).
//
// Layouts (one layer, one direction, time-major):
//   x (T, B, F), W (F, 3H), U (H, 3H), b (3H,), b_hn (H,), h0 (B, H); gates r, z, n (GRU_GATES).
//   r = sigmoid(x W_r + b_r + h U_r),  z = sigmoid(x W_z + b_z + h U_z),
//   n = tanh(x W_n + b_n + r (h U_n + b_hn)),  h' = (1 - z) n + z h.
//
//   forward   Z = x W (all steps, one GEMM) into the workspace; per step Zh = h_{t-1} U (one GEMM)
//             and one fused pointwise loop that adds the biases, applies the gates, writes h_t
//             and overwrites Z_t with what the backward reads: (r, z, n, h U_n + b_hn).
//   backward  per step, backwards: one fused pointwise loop gives the gradients of the recurrent
//             pre-activations dR_t = (da_r, da_z, da_n r) and of the input ones dX_t = (da_r, da_z,
//             da_n), and z dh_t; then dh_{t-1} = z dh_t + dR_t U^T (one GEMM, added in the next
//             step's loop); after the loop the weight gradients as single GEMMs over all steps:
//             dU = H_prev^T dR, dW = x^T dX, dx = dX W^T, db = column sums of dX, db_hn = column
//             sums of dR's n block. The attribute need_dx false (x not differentiated: a network's
//             data) skips dx, whose result the caller then declares empty, (0,) (under vmap
//             (..., 0): XLA allocates no T B F buffer the kernel would leave unwritten).
//   inference the forward without a workspace: x W into per-thread scratch, the loop keeps nothing.
// Workspace (float32): the activations A (T, B, 4H) (float32: h_t are the outputs); in bfloat16,
// then the float32 states h (T, B, H) (the outputs are bfloat16).
//
// Groups: every operand and result may carry the same leading dims (`jax.vmap` with
// vmap_method="broadcast_all": a population of layers, both directions of a bidirectional layer,
// nested vmaps). The handlers fold them into G independent layers, each with its own x, W, U, b,
// b_hn, h0 and workspace, and run them through ForGroups (common.h): in parallel OpenMP threads when
// there are at least half as many layers as threads, else one after another with the GEMMs on every
// thread. Scratch memory is thread_local, so each thread has its own.

#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "common.h"

namespace ffi = xla::ffi;

namespace {

using namespace recurrent_native;

template <typename P>
constexpr bool kFloatOutputs = std::is_same_v<typename P::T, float>;

// The FFI dtype of x, ys and their gradients (P::T); W, U, the biases, h and their gradients are F32.
template <typename P>
constexpr ffi::DataType kCompute = kFloatOutputs<P> ? ffi::F32 : ffi::BF16;

// One step's gates. zx (B rows `ldz` apart) holds x_t W (float32), zh (B, 3H) holds h_{t-1} U.
// The input part is x_t W + b (rounded through P: bfloat16(x W + b), as the cell's projection);
// r = sigmoid(x_r + h_r), z = sigmoid(x_z + h_z), n = tanh(x_n + r (h_n + b_hn)),
// h_t = (1 - z) n + z h_{t-1} (float32, the cell's state) and, in bfloat16, y_t = bf16(h_t).
// kKeep: zx's rows (4H wide) become (r, z, n, h_n + b_hn) for the backward.
template <typename P, bool kKeep>
RECURRENT_CLONES void GruForwardStep(int64_t B, int64_t H, float* __restrict zx, int64_t ldz,
                                     const float* __restrict zh, const float* __restrict bias,
                                     const float* __restrict bhn, const float* __restrict h_prev, float* __restrict h,
                                     typename P::T* __restrict y) {
  for (int64_t n = 0; n < B; ++n) {
    float* __restrict xr = zx + n * ldz;
    float* __restrict xz = xr + H;
    float* __restrict xn = xz + H;
    float* __restrict keep = xn + H;
    const float* __restrict hr = zh + n * 3 * H;
    const float* __restrict hz = hr + H;
    const float* __restrict hn = hz + H;
    const float* __restrict hp = h_prev + n * H;
    float* __restrict hh = h + n * H;
    for (int64_t j = 0; j < H; ++j) {
      float ar = P::Round(xr[j] + bias[j]) + hr[j];
      float az = P::Round(xz[j] + bias[H + j]) + hz[j];
      float an = P::Round(xn[j] + bias[2 * H + j]);
      float rec = hn[j] + bhn[j];
      float r = Sigmoid(ar);
      float z = Sigmoid(az);
      float c = Tanh(an + r * rec);
      float hj = (1.f - z) * c + z * hp[j];
      if constexpr (kKeep) {
        xr[j] = r;
        xz[j] = z;
        xn[j] = c;
        keep[j] = rec;
      }
      hh[j] = hj;
      if constexpr (!kFloatOutputs<P>) y[n * H + j] = P::Store(hj);
    }
  }
}

// One step backwards: from the activations a (B, 4H) = (r, z, n, h U_n + b_hn), h_{t-1}, dL/dh_t
// as zdh + g (g: the GEMM's dR_{t+1} U^T, rounded through P as the scan's derivative rounds the
// cotangent of its bfloat16 matmul operand) plus dy_t: the pre-activation gradients dR (recurrent,
// B x 3H) and dX (input, B x 3H), stored as P::T (bfloat16 for the bfloat16 GEMMs); zdh becomes
// z dh_t (dh_{t-1} without its GEMM part); db += dX (as stored), dbhn += da_n r (float32).
template <typename P>
RECURRENT_CLONES void GruBackwardStep(int64_t B, int64_t H, const float* __restrict a,
                                      const float* __restrict h_prev, float* __restrict zdh,
                                      const float* __restrict g, const typename P::T* __restrict dy,
                                      typename P::T* __restrict dR, typename P::T* __restrict dX,
                                      float* __restrict db, float* __restrict dbhn) {
  using T = typename P::T;
  for (int64_t n = 0; n < B; ++n) {
    const float* __restrict ar = a + n * 4 * H;
    const float* __restrict az = ar + H;
    const float* __restrict an = az + H;
    const float* __restrict arec = an + H;
    const float* __restrict hp = h_prev + n * H;
    float* __restrict zdhn = zdh + n * H;
    const float* __restrict gn = g + n * H;
    const T* __restrict dyn = dy + n * H;
    T* __restrict dRr = dR + n * 3 * H;
    T* __restrict dRz = dRr + H;
    T* __restrict dRn = dRz + H;
    T* __restrict dXr = dX + n * 3 * H;
    T* __restrict dXz = dXr + H;
    T* __restrict dXn = dXz + H;
    for (int64_t j = 0; j < H; ++j) {
      float r = ar[j], z = az[j], c = an[j], rec = arec[j];
      float dh = (zdhn[j] + P::Round(gn[j])) + P::Load(dyn[j]);
      float da_n = dh * (1.f - z) * (1.f - c * c);
      float da_z = dh * (hp[j] - c) * z * (1.f - z);
      float da_r = da_n * rec * r * (1.f - r);
      float dn_rec = da_n * r;
      T sr = P::Store(da_r), sz = P::Store(da_z);
      dRr[j] = sr;
      dRz[j] = sz;
      dRn[j] = P::Store(dn_rec);
      dXr[j] = sr;
      dXz[j] = sz;
      dXn[j] = P::Store(da_n);
      zdhn[j] = dh * z;
      dbhn[j] += dn_rec;
    }
    for (int64_t k = 0; k < 3 * H; ++k) db[k] += P::Load(dX[n * 3 * H + k]);
  }
}

// dh0 = zdh + g (g rounded through P).
template <typename P>
void GruLastDh(int64_t B, int64_t H, const float* zdh, const float* g, float* dh0) {
  for (int64_t k = 0; k < B * H; ++k) dh0[k] = zdh[k] + P::Round(g[k]);
}

int64_t GruWorkspaceFloats(const Shape& s, bool bf16) { return s.T * s.B * (bf16 ? 5 : 4) * s.H; }

// One layer's element counts, which are also the strides between the layers of a call's buffers:
// x (T, B, F), W (F, 3H), U (H, 3H), b (3H,), b_hn (H,), h0 and hT (B, H), ys (T, B, H) and their
// gradients, and the workspace's floats.
struct GruSizes {
  int64_t x, W, U, b, bhn, h, ys, workspace;
};

GruSizes GruSizesOf(const Shape& s, bool bf16) {
  const int64_t G = 3 * s.H;
  return {s.T * s.B * s.F, s.F * G, s.H * G, G, s.H, s.B * s.H, s.T * s.B * s.H, GruWorkspaceFloats(s, bf16)};
}

// Pointers to one layer's operands and results of a forward call (T: how x and ys are stored);
// workspace: nullptr in inference.
template <typename T>
struct GruForwardArgs {
  const T* x;
  const float *W, *U, *b, *bhn, *h0;
  T* ys;
  float* hT;
  float* workspace;
};

// Pointers to one layer's operands and results of a backward call (b and b_hn are not read: the
// workspace holds h U_n + b_hn).
template <typename T>
struct GruBackwardArgs {
  const T* x;
  const float *W, *U, *h0;
  const T* ys;
  const float* workspace;
  const T* dys;
  const float* dhT;
  T* dx;  // nullptr: dx is not wanted (need_dx false), and not computed
  float *dW, *dU, *db, *dbhn, *dh0;
};

// ---- float32 -----------------------------------------------------------------------------------

// The float32 forward: with a workspace (T, B, 4H) the training one, without (kKeep false) the
// inference one.
template <bool kKeep>
ffi::Error GruFused(const Shape& s, const GruForwardArgs<float>& a) {
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 3 * H;
  thread_local std::vector<float> scratch, inference;
  float* zh = Scratch(scratch, B * G);
  const int64_t ldz = kKeep ? 4 * H : G;
  float* Z = kKeep ? a.workspace : Scratch(inference, T * B * G);
  if (!Gemm('N', 'N', T * B, G, F, a.x, F, a.W, G, 0.f, Z, ldz)) return Fail("x W failed");
  for (int64_t t = 0; t < T; ++t) {
    const float* h_prev = t == 0 ? a.h0 : a.ys + (t - 1) * B * H;
    if (!Gemm('N', 'N', B, G, H, h_prev, H, a.U, G, 0.f, zh, G)) return Fail("h U failed");
    GruForwardStep<Fp32, kKeep>(B, H, Z + t * B * ldz, ldz, zh, a.b, a.bhn, h_prev, a.ys + t * B * H, nullptr);
  }
  std::memcpy(a.hT, a.ys + (T - 1) * B * H, B * H * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error GruBackward(const Shape& s, const GruBackwardArgs<float>& a) {
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 3 * H;
  const float* A = a.workspace;
  thread_local std::vector<float> grads, weights;
  // dR, dX (T, B, 3H) each; then zdh and g, one step's (B, H) each.
  float* dR = Scratch(grads, 2 * T * B * G + 2 * B * H);
  float* dX = dR + T * B * G;
  float* zdh = dX + T * B * G;
  float* g = zdh + B * H;
  // U^T (3H, H) once: a transposed operand would cost dnnl_sgemm a repacking on every step.
  float* Ut = Scratch(weights, G * H);
  Transpose<Fp32>(a.U, H, G, Ut, H);
  std::memcpy(zdh, a.dhT, B * H * sizeof(float));
  std::fill(g, g + B * H, 0.f);
  std::fill(a.db, a.db + G, 0.f);
  std::fill(a.dbhn, a.dbhn + H, 0.f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* h_prev = t == 0 ? a.h0 : a.ys + (t - 1) * B * H;
    GruBackwardStep<Fp32>(B, H, A + t * B * 4 * H, h_prev, zdh, g, a.dys + t * B * H, dR + t * B * G, dX + t * B * G,
                          a.db, a.dbhn);
    if (!Gemm('N', 'N', B, H, G, dR + t * B * G, G, Ut, H, 0.f, g, H)) return Fail("dR U^T failed");
  }
  GruLastDh<Fp32>(B, H, zdh, g, a.dh0);
  // dU = [h0; h_1 .. h_{T-1}]^T dR, dW = x^T dX, dx = dX W^T (where wanted): single GEMMs over all steps.
  if (!Gemm('T', 'N', H, G, B, a.h0, H, dR, G, 0.f, a.dU, G)) return Fail("h0^T dR failed");
  if (!Gemm('T', 'N', H, G, (T - 1) * B, a.ys, H, dR + B * G, G, 1.f, a.dU, G)) return Fail("h^T dR failed");
  if (!Gemm('T', 'N', F, G, T * B, a.x, F, dX, G, 0.f, a.dW, G)) return Fail("x^T dX failed");
  if (a.dx != nullptr && !Gemm('N', 'T', T * B, F, G, dX, G, a.W, G, 0.f, a.dx, F)) return Fail("dX W^T failed");
  return ffi::Error::Success();
}

// ---- The bfloat16 path ----------------------------------------------------------------------
//
// `recurrent.gru(H, dtype=jnp.bfloat16)` with float32 parameters: every GEMM takes bfloat16
// operands and accumulates in float32 (`dnnl_gemm_bf16bf16f32`); as the cell: x W + b rounded to
// bfloat16 (the projection), h_{t-1} rounded to bfloat16 for h U (whose bfloat16 rounding of h_t is
// the output y_t, so the GEMM reads y_{t-1}), the state h and the gates float32. x, ys, dx and dys
// are bfloat16; W, U, b, b_hn, h0, hT and their gradients float32.
//   backward  as the float32 one, with the scan's roundings: dX rounded to bfloat16 (the
//             cotangent of the bfloat16 projection: db sums the rounded values), dR U^T rounded to
//             bfloat16 (the cotangent of the bfloat16 h operand); dR is rounded to bfloat16 for
//             the GEMMs too (the scan's keeps it float32), dU and dW are single GEMMs over all
//             steps accumulated in float32 (the scan rounds each step's term to bfloat16 first).

// The bfloat16 forward; the workspace (training): the activations (T, B, 4H), then h (T, B, H).
template <bool kKeep>
ffi::Error GruFused(const Shape& s, const GruForwardArgs<bf16>& a) {
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 3 * H;
  thread_local std::vector<bf16> weights;
  thread_local std::vector<float> step, inference;
  bf16* Wb = Scratch(weights, (F + H) * G + B * H);
  bf16* Ub = Wb + F * G;
  bf16* h0b = Ub + H * G;
  ToBf16Rows(F, G, a.W, G, Wb, G);
  ToBf16Rows(H, G, a.U, G, Ub, G);
  ToBf16Rows(B, H, a.h0, H, h0b, H);
  const int64_t ldz = kKeep ? 4 * H : G;
  // zh (B, 3H); in inference, the states ping-pong between two (B, H) rows after it.
  float* zh = Scratch(step, B * G + 2 * B * H);
  float* Z = kKeep ? a.workspace : Scratch(inference, T * B * G);
  float* Hs = kKeep ? a.workspace + T * B * 4 * H : nullptr;
  if (!GemmBf16('N', 'N', T * B, G, F, a.x, F, Wb, G, 0.f, Z, ldz)) return Fail("x W (bfloat16) failed");
  const float* h_prev = a.h0;
  for (int64_t t = 0; t < T; ++t) {
    const bf16* hb_prev = t == 0 ? h0b : a.ys + (t - 1) * B * H;
    if (!GemmBf16('N', 'N', B, G, H, hb_prev, H, Ub, G, 0.f, zh, G)) return Fail("h U (bfloat16) failed");
    float* h = kKeep ? Hs + t * B * H : zh + B * G + (t % 2) * B * H;
    GruForwardStep<Bf16, kKeep>(B, H, Z + t * B * ldz, ldz, zh, a.b, a.bhn, h_prev, h, a.ys + t * B * H);
    h_prev = h;
  }
  std::memcpy(a.hT, h_prev, B * H * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error GruBackward(const Shape& s, const GruBackwardArgs<bf16>& a) {
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 3 * H;
  const float* A = a.workspace;
  const float* Hs = A + T * B * 4 * H;
  thread_local std::vector<bf16> operands;
  thread_local std::vector<float> results;
  // dR, dX (T, B, 3H), U^T (3H, H), h0 and, for dx, W (F, 3H) in bfloat16.
  const bool need_dx = a.dx != nullptr;
  bf16* dR = Scratch(operands, 2 * T * B * G + G * H + B * H + (need_dx ? F * G : 0));
  bf16* dX = dR + T * B * G;
  bf16* Ut = dX + T * B * G;
  bf16* h0b = Ut + G * H;
  bf16* Wb = h0b + B * H;
  Transpose<Bf16>(a.U, H, G, Ut, H);
  ToBf16Rows(B, H, a.h0, H, h0b, H);
  if (need_dx) ToBf16Rows(F, G, a.W, G, Wb, G);
  // zdh and g, one step's (B, H) each; then (for dx) dx in float32 (T, B, F).
  float* zdh = Scratch(results, 2 * B * H + (need_dx ? T * B * F : 0));
  float* g = zdh + B * H;
  float* dxf = g + B * H;
  std::memcpy(zdh, a.dhT, B * H * sizeof(float));
  std::fill(g, g + B * H, 0.f);
  std::fill(a.db, a.db + G, 0.f);
  std::fill(a.dbhn, a.dbhn + H, 0.f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* h_prev = t == 0 ? a.h0 : Hs + (t - 1) * B * H;
    GruBackwardStep<Bf16>(B, H, A + t * B * 4 * H, h_prev, zdh, g, a.dys + t * B * H, dR + t * B * G, dX + t * B * G,
                          a.db, a.dbhn);
    if (!GemmBf16('N', 'N', B, H, G, dR + t * B * G, G, Ut, H, 0.f, g, H)) return Fail("dR U^T (bfloat16) failed");
  }
  GruLastDh<Bf16>(B, H, zdh, g, a.dh0);
  // dU = [bf16(h0); y_1 .. y_{T-1}]^T dR (the outputs are the rounded states the forward's GEMMs
  // read), dW = x^T dX, dx = dX W^T (where wanted).
  if (!GemmBf16('T', 'N', H, G, B, h0b, H, dR, G, 0.f, a.dU, G)) return Fail("h0^T dR (bfloat16) failed");
  if (!GemmBf16('T', 'N', H, G, (T - 1) * B, a.ys, H, dR + B * G, G, 1.f, a.dU, G))
    return Fail("h^T dR (bfloat16) failed");
  if (!GemmBf16('T', 'N', F, G, T * B, a.x, F, dX, G, 0.f, a.dW, G)) return Fail("x^T dX (bfloat16) failed");
  if (need_dx) {
    if (!GemmBf16('N', 'T', T * B, F, G, dX, G, Wb, G, 0.f, dxf, F)) return Fail("dX W^T (bfloat16) failed");
    ToBf16Rows(T * B, F, dxf, F, a.dx, F);
  }
  return ffi::Error::Success();
}

// ---- The handlers: one template over the compute dtype (P), each running a call's G layers -------

// The forward of every layer of a call: the training one (kKeep, with `workspace`) or the inference one.
template <typename P, bool kKeep>
ffi::Error GruForwardGroups(ffi::Buffer<kCompute<P>>& x, ffi::Buffer<ffi::F32>& W, ffi::Buffer<ffi::F32>& U,
                            ffi::Buffer<ffi::F32>& b, ffi::Buffer<ffi::F32>& bhn, ffi::Buffer<ffi::F32>& h0,
                            ffi::ResultBuffer<kCompute<P>>& ys, ffi::ResultBuffer<ffi::F32>& hT,
                            ffi::ResultBuffer<ffi::U8>* workspace) {
  const Groups gr = GroupsOf(x, U);
  const Shape& s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  const GruSizes n = GruSizesOf(s, !kFloatOutputs<P>);
  if (!(gr.Holds(x, n.x) && gr.Holds(W, n.W) && gr.Holds(U, n.U) && gr.Holds(b, n.b) && gr.Holds(bhn, n.bhn) &&
        gr.Holds(h0, n.h) && gr.Holds(*ys, n.ys) && gr.Holds(*hT, n.h)))
    return Fail("operands with different leading (group) dims");
  float* ws = nullptr;
  if constexpr (kKeep) {
    if ((*workspace)->size_bytes() != static_cast<size_t>(gr.G * n.workspace) * sizeof(float))
      return Fail("workspace size mismatch");
    ws = reinterpret_cast<float*>((*workspace)->untyped_data());
  }
  return ForGroups(gr.G, [&](int64_t g) {
    return GruFused<kKeep>(s, GruForwardArgs<typename P::T>{
                                  x.typed_data() + g * n.x, W.typed_data() + g * n.W, U.typed_data() + g * n.U,
                                  b.typed_data() + g * n.b, bhn.typed_data() + g * n.bhn, h0.typed_data() + g * n.h,
                                  ys->typed_data() + g * n.ys, hT->typed_data() + g * n.h,
                                  kKeep ? ws + g * n.workspace : nullptr});
  });
}

template <typename P>
ffi::Error GruForwardImpl(ffi::Buffer<kCompute<P>> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                          ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> bhn, ffi::Buffer<ffi::F32> h0,
                          ffi::ResultBuffer<kCompute<P>> ys, ffi::ResultBuffer<ffi::F32> hT,
                          ffi::ResultBuffer<ffi::U8> workspace) {
  return GruForwardGroups<P, true>(x, W, U, b, bhn, h0, ys, hT, &workspace);
}

template <typename P>
ffi::Error GruInferenceImpl(ffi::Buffer<kCompute<P>> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                            ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> bhn, ffi::Buffer<ffi::F32> h0,
                            ffi::ResultBuffer<kCompute<P>> ys, ffi::ResultBuffer<ffi::F32> hT) {
  return GruForwardGroups<P, false>(x, W, U, b, bhn, h0, ys, hT, nullptr);
}

template <typename P>
ffi::Error GruBackwardImpl(ffi::Buffer<kCompute<P>> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                           ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> bhn, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<kCompute<P>> ys, ffi::Buffer<ffi::U8> workspace,
                           ffi::Buffer<kCompute<P>> dys, ffi::Buffer<ffi::F32> dhT,
                           ffi::ResultBuffer<kCompute<P>> dx, ffi::ResultBuffer<ffi::F32> dW,
                           ffi::ResultBuffer<ffi::F32> dU, ffi::ResultBuffer<ffi::F32> db,
                           ffi::ResultBuffer<ffi::F32> dbhn, ffi::ResultBuffer<ffi::F32> dh0, bool need_dx) {
  const Groups gr = GroupsOf(x, U);
  const Shape& s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  const GruSizes n = GruSizesOf(s, !kFloatOutputs<P>);
  if (!(gr.Holds(x, n.x) && gr.Holds(W, n.W) && gr.Holds(U, n.U) && gr.Holds(b, n.b) && gr.Holds(bhn, n.bhn) &&
        gr.Holds(h0, n.h) && gr.Holds(ys, n.ys) && gr.Holds(dys, n.ys) && gr.Holds(dhT, n.h) &&
        gr.Holds(*dx, need_dx ? n.x : 0) && gr.Holds(*dW, n.W) && gr.Holds(*dU, n.U) && gr.Holds(*db, n.b) &&
        gr.Holds(*dbhn, n.bhn) && gr.Holds(*dh0, n.h)))
    return Fail("operands with different leading (group) dims");
  if (workspace.size_bytes() != static_cast<size_t>(gr.G * n.workspace) * sizeof(float))
    return Fail("workspace size mismatch");
  const float* ws = reinterpret_cast<const float*>(workspace.untyped_data());
  return ForGroups(gr.G, [&](int64_t g) {
    return GruBackward(s, GruBackwardArgs<typename P::T>{
                              x.typed_data() + g * n.x, W.typed_data() + g * n.W, U.typed_data() + g * n.U,
                              h0.typed_data() + g * n.h, ys.typed_data() + g * n.ys, ws + g * n.workspace,
                              dys.typed_data() + g * n.ys, dhT.typed_data() + g * n.h,
                              need_dx ? dx->typed_data() + g * n.x : nullptr,
                              dW->typed_data() + g * n.W, dU->typed_data() + g * n.U, db->typed_data() + g * n.b,
                              dbhn->typed_data() + g * n.bhn, dh0->typed_data() + g * n.h});
  });
}

}  // namespace

// The training forward's workspace in bytes for one shape (bf16: bfloat16 compute), which the
// Python wrapper sizes the workspace output with at trace time.
extern "C" int64_t recurrent_gru_workspace_bytes(int64_t B, int64_t T, int64_t F, int64_t H, int64_t bf16) {
  return GruWorkspaceFloats({B, T, F, H}, bf16 != 0) * static_cast<int64_t>(sizeof(float));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentGruForward, GruForwardImpl<Fp32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W
                                  .Arg<ffi::Buffer<ffi::F32>>()   // U
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hT
                                  .Ret<ffi::Buffer<ffi::U8>>());  // workspace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentGruInference, GruInferenceImpl<Fp32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // W
                                  .Arg<ffi::Buffer<ffi::F32>>()    // U
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()    // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()    // ys
                                  .Ret<ffi::Buffer<ffi::F32>>());  // hT

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentGruBackward, GruBackwardImpl<Fp32>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // W
                                  .Arg<ffi::Buffer<ffi::F32>>()    // U
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()    // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()    // ys
                                  .Arg<ffi::Buffer<ffi::U8>>()     // workspace
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dhT
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dW
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dU
                                  .Ret<ffi::Buffer<ffi::F32>>()    // db
                                  .Ret<ffi::Buffer<ffi::F32>>()    // db_hn
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dh0
                                  .Attr<bool>("need_dx"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentGruForwardBf16, GruForwardImpl<Bf16>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W
                                  .Arg<ffi::Buffer<ffi::F32>>()   // U
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hT
                                  .Ret<ffi::Buffer<ffi::U8>>());  // workspace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentGruInferenceBf16, GruInferenceImpl<Bf16>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // W
                                  .Arg<ffi::Buffer<ffi::F32>>()    // U
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()    // h0
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // ys
                                  .Ret<ffi::Buffer<ffi::F32>>());  // hT

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentGruBackwardBf16, GruBackwardImpl<Bf16>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // W
                                  .Arg<ffi::Buffer<ffi::F32>>()    // U
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()    // h0
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // ys
                                  .Arg<ffi::Buffer<ffi::U8>>()     // workspace
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dhT
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dW
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dU
                                  .Ret<ffi::Buffer<ffi::F32>>()    // db
                                  .Ret<ffi::Buffer<ffi::F32>>()    // db_hn
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dh0
                                  .Attr<bool>("need_dx"));
