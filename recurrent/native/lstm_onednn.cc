// One plain LSTM layer as XLA FFI custom calls: the undifferentiated forward through oneDNN's
// LSTM primitive (its fast brgemm inference kernel, the one PyTorch's CPU LSTM uses), and a
// hand-fused training forward and backward around oneDNN's JIT GEMM (`dnnl_sgemm`); in bfloat16
// compute, the same fused loops around its bfloat16 GEMM (the bfloat16 path, further down).
//
// Layouts (float32, one layer, one direction, time-major):
//   x (T, B, F), W (F, 4H), U (H, 4H), b (4H,), h0, c0 (B, H); gates i, f, g, o.
// For the primitive, ours are oneDNN's user layouts as they are: x is `tnc` (oneDNN picks its fast
// brgemm implementation for `tnc`, its reference one for batch-first `ntc`), W and U are `ldigo`
// with L = D = 1, b is `ldgo`, and oneDNN's gate order (i, f, c~, o) is ours. The primitive picks
// its own weight layouts (`any`); the weights are reordered into them on every call.
//
// Training (oneDNN's LSTM primitive runs reference code for forward training and backward on
// CPUs, so it is not used there):
//   forward   Z = x W (all steps, one GEMM) into the workspace; per step Z_t += h_{t-1} U (one
//             GEMM) and one fused pointwise loop that adds b, applies the gates, writes c_t, h_t
//             and overwrites Z_t with the activations (i, f, g, o) the backward reads.
//   backward  per step, backwards: one fused pointwise loop gives dZ_t and dc_{t-1}, then
//             dh_{t-1} = dZ_t U^T (one GEMM); after the loop the weight gradients as single GEMMs
//             over all steps: dU = H_prev^T dZ, dW = x^T dZ, dx = dZ W^T, db = column sums of dZ.
// Workspace (float32): the activations A (T, B, 4H), then c (T, B, H).

#include <oneapi/dnnl/dnnl.hpp>

#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Shape {
  int64_t B, T, F, H;
  bool operator<(const Shape& o) const { return std::tie(B, T, F, H) < std::tie(o.B, o.T, o.F, o.H); }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

// One lock around the primitive cache and every execution of the primitive: XLA may run custom
// calls from several threads, and the primitives share one stream. The training path needs none.
std::mutex& Lock() {
  static std::mutex mutex;
  return mutex;
}

struct Descs {
  memory::desc x, h, W, U, b, y;
};

Descs UserDescs(const Shape& s) {
  return {memory::desc({s.T, s.B, s.F}, dt::f32, tag::tnc),
          memory::desc({1, 1, s.B, s.H}, dt::f32, tag::ldnc),
          memory::desc({1, 1, s.F, 4, s.H}, dt::f32, tag::ldigo),
          memory::desc({1, 1, s.H, 4, s.H}, dt::f32, tag::ldigo),
          memory::desc({1, 1, 4, s.H}, dt::f32, tag::ldgo),
          memory::desc({s.T, s.B, s.H}, dt::f32, tag::tnc)};
}

memory::desc Any(const memory::desc& d) { return memory::desc(d.get_dims(), dt::f32, tag::any); }

// oneDNN's inference forward for one shape.
struct Forward {
  dnnl::lstm_forward::primitive_desc pd;
  dnnl::lstm_forward prim;
};

Forward& ForwardFor(const Shape& s) {
  static std::map<Shape, std::unique_ptr<Forward>> cache;
  auto& slot = cache[s];
  if (!slot) {
    Descs d = UserDescs(s);
    dnnl::lstm_forward::primitive_desc pd(Engine(), dnnl::prop_kind::forward_inference,
                                          dnnl::rnn_direction::unidirectional_left2right, d.x, d.h, d.h, Any(d.W),
                                          Any(d.U), d.b, d.y, d.h, d.h);
    slot.reset(new Forward{pd, dnnl::lstm_forward(pd)});
  }
  return *slot;
}

memory Wrap(const memory::desc& d, const void* p) { return memory(d, Engine(), const_cast<void*>(p)); }

// `user` in the primitive's layout `want`: the same memory if they agree, else a reordered copy.
memory Into(const memory& user, const memory::desc& want) {
  if (user.get_desc() == want) return user;
  memory out(want, Engine());
  dnnl::reorder(user, out).execute(Stream(), const_cast<memory&>(user), out);
  return out;
}

ffi::Error Fail(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal, "recurrent native LSTM: " + what);
}

template <typename X>
Shape ShapeOf(const X& x, const ffi::Buffer<ffi::F32>& U) {
  auto xd = x.dimensions();
  return {xd[1], xd[0], xd[2], U.dimensions()[0]};  // x is (T, B, F)
}

// The undifferentiated forward: oneDNN's inference primitive.
ffi::Error InferenceImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                         ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                         ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT,
                         ffi::ResultBuffer<ffi::F32> cT) {
  try {
    Shape s = ShapeOf(x, U);
    std::lock_guard<std::mutex> guard(Lock());
    Forward& f = ForwardFor(s);
    Descs d = UserDescs(s);
    memory Wp = Into(Wrap(d.W, W.typed_data()), f.pd.weights_layer_desc());
    memory Up = Into(Wrap(d.U, U.typed_data()), f.pd.weights_iter_desc());
    f.prim.execute(Stream(), {{DNNL_ARG_SRC_LAYER, Wrap(d.x, x.typed_data())},
                              {DNNL_ARG_SRC_ITER, Wrap(d.h, h0.typed_data())},
                              {DNNL_ARG_SRC_ITER_C, Wrap(d.h, c0.typed_data())},
                              {DNNL_ARG_WEIGHTS_LAYER, Wp},
                              {DNNL_ARG_WEIGHTS_ITER, Up},
                              {DNNL_ARG_BIAS, Wrap(d.b, b.typed_data())},
                              {DNNL_ARG_DST_LAYER, Wrap(d.y, ys->typed_data())},
                              {DNNL_ARG_DST_ITER, Wrap(d.h, hT->typed_data())},
                              {DNNL_ARG_DST_ITER_C, Wrap(d.h, cT->typed_data())}});
    Stream().wait();
  } catch (const dnnl::error& e) {
    return Fail(e.what());
  }
  return ffi::Error::Success();
}

// ---- The fused training path ----------------------------------------------------------------

// Row-major C (M, N) = alpha op(A) op(B) + beta C through oneDNN's JIT GEMM; false on failure.
bool Gemm(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B_,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return true;
  if (K == 0) {  // dnnl_sgemm may reject K = 0: C = beta C
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.f ? 0.f : beta * C[m * ldc + n];
    return true;
  }
  return dnnl_sgemm(ta, tb, M, N, K, 1.f, A, lda, B_, ldb, beta, C, ldc) == dnnl_success;
}

// exp(x) for x in [-87.3, 88.3] (clamped outside), Cephes' single-precision polynomial (about
// 1 ulp), written so that the compiler vectorises the loops that inline it.
inline float Exp(float x) {
  x = x > 88.3f ? 88.3f : x;
  x = x < -87.3f ? -87.3f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (branch-free, unlike floor without SSE4.1).
  float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Exactly 0 below -87 and exactly 1 above 17 (1 + e^-x rounds to 1): the hold input that freezes
// padded steps saturates the input and forget gates with +-1e30, which must give exact 0 and 1.
inline float Sigmoid(float x) {
  float s = 1.f / (1.f + Exp(-x));
  return x < -87.f ? 0.f : s;
}

inline float Tanh(float x) {
  float e = Exp(x < 0.f ? 2.f * x : -2.f * x);
  float t = (1.f - e) / (1.f + e);
  return x < 0.f ? -t : t;
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define RECURRENT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RECURRENT_CLONES
#endif

using bf16 = uint16_t;  // XLA's FFI maps BF16 buffers to uint16_t, oneDNN's bfloat16_t is one too

// float32 to bfloat16, rounding to nearest even (as XLA's convert); NaN stays a (quiet) NaN.
inline bf16 ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<bf16>((bits & 0x7FFFFFFFu) > 0x7F800000u ? (bits >> 16) | 0x40u : rounded);
}

inline float FromBf16(bf16 x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float RoundBf16(float x) { return FromBf16(ToBf16(x)); }

// The fused loops compute in float32 and are written once over these two policies: T, the type
// h, dy and dz are stored in (Load and Store convert), Round, a float32 rounded through T (the
// identity for float32), and whether h_{t-1} U reaches the forward step apart from x_t W.
struct Fp32 {
  using T = float;
  static constexpr bool kSplitGemm = false;
  static float Load(float x) { return x; }
  static float Store(float x) { return x; }
  static float Round(float x) { return x; }
};

struct Bf16 {
  using T = bf16;
  static constexpr bool kSplitGemm = true;
  static float Load(bf16 x) { return FromBf16(x); }
  static bf16 Store(float x) { return ToBf16(x); }
  static float Round(float x) { return RoundBf16(x); }
};

// One step's gates: z (B, 4H) holds [x_t, h_{t-1}] [W; U] (float32), or x_t W with h_{t-1} U in
// zh (bfloat16: the pre-activation is bf16(x_t W + b) + h_{t-1} U, as the cell's); z becomes the
// activations (i, f, g, o); writes c_t and h_t. `__restrict`: the arrays never overlap, which lets
// the loop vectorise.
template <typename P>
RECURRENT_CLONES void ForwardStep(int64_t B, int64_t H, float* __restrict z, const float* __restrict zh,
                                  const float* __restrict bias, const float* __restrict c_prev, float* __restrict c,
                                  typename P::T* __restrict h) {
  for (int64_t n = 0; n < B; ++n) {
    float* __restrict zi = z + n * 4 * H;
    float* __restrict zf = zi + H;
    float* __restrict zg = zf + H;
    float* __restrict zo = zg + H;
    const float* __restrict zhn = P::kSplitGemm ? zh + n * 4 * H : nullptr;
    const float* __restrict cp = c_prev + n * H;
    float* __restrict cn = c + n * H;
    typename P::T* __restrict hn = h + n * H;
    for (int64_t j = 0; j < H; ++j) {
      float zij = zi[j] + bias[j], zfj = zf[j] + bias[H + j];
      float zgj = zg[j] + bias[2 * H + j], zoj = zo[j] + bias[3 * H + j];
      if constexpr (P::kSplitGemm) {
        zij = P::Round(zij) + zhn[j];
        zfj = P::Round(zfj) + zhn[H + j];
        zgj = P::Round(zgj) + zhn[2 * H + j];
        zoj = P::Round(zoj) + zhn[3 * H + j];
      }
      float i = Sigmoid(zij);
      float f = Sigmoid(zfj);
      float g = Tanh(zgj);
      float o = Sigmoid(zoj);
      float cj = f * cp[j] + i * g;
      zi[j] = i;
      zf[j] = f;
      zg[j] = g;
      zo[j] = o;
      cn[j] = cj;
      hn[j] = P::Store(o * Tanh(cj));
    }
  }
}

// One step backwards: from the activations a (B, 4H), c_t, c_{t-1}, dh = dL/dh_t from step t + 1
// (rows `dh_stride` apart) plus dy = dL/dy_t, and dc = dL/dc_t (updated in place to dL/dc_{t-1}),
// the gate gradients dz (B, 4H), summed into db (4H). In bfloat16, dh = bf16(bf16(dh_t) + dy_t)
// and dz is stored as bfloat16, whose float32 values are summed into db.
template <typename P>
RECURRENT_CLONES void BackwardStep(int64_t B, int64_t H, const float* __restrict a, const float* __restrict c,
                                   const float* __restrict c_prev, const float* __restrict dh, int64_t dh_stride,
                                   const typename P::T* __restrict dy, float* __restrict dc,
                                   typename P::T* __restrict dz, float* __restrict db) {
  using T = typename P::T;
  for (int64_t n = 0; n < B; ++n) {
    const float* __restrict ai = a + n * 4 * H;
    const float* __restrict af = ai + H;
    const float* __restrict ag = af + H;
    const float* __restrict ao = ag + H;
    const float* __restrict cn = c + n * H;
    const float* __restrict cp = c_prev + n * H;
    const float* __restrict dhn = dh + n * dh_stride;
    const T* __restrict dyn = dy + n * H;
    float* __restrict dcn = dc + n * H;
    T* __restrict di = dz + n * 4 * H;
    T* __restrict df = di + H;
    T* __restrict dg = df + H;
    T* __restrict dO = dg + H;
    for (int64_t j = 0; j < H; ++j) {
      float i = ai[j], f = af[j], g = ag[j], o = ao[j];
      float tc = Tanh(cn[j]);
      float dhj = P::Round(P::Round(dhn[j]) + P::Load(dyn[j]));
      float dcj = dcn[j] + dhj * o * (1.f - tc * tc);
      di[j] = P::Store(dcj * g * i * (1.f - i));
      df[j] = P::Store(dcj * cp[j] * f * (1.f - f));
      dg[j] = P::Store(dcj * i * (1.f - g * g));
      dO[j] = P::Store(dhj * tc * o * (1.f - o));
      dcn[j] = dcj * f;
    }
    for (int64_t k = 0; k < 4 * H; ++k) db[k] += P::Load(di[k]);
  }
}

// Scratch memory that stays with the calling thread between calls (no page faults per call).
template <typename T>
T* Scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// a (R, C) float32 row-major into out (C, R) (stored as P::T), whose rows are `ld` apart.
template <typename P>
void Transpose(const float* a, int64_t R, int64_t C, typename P::T* out, int64_t ld) {
  constexpr int64_t k = 32;
  for (int64_t r0 = 0; r0 < R; r0 += k)
    for (int64_t c0 = 0; c0 < C; c0 += k)
      for (int64_t r = r0; r < std::min(R, r0 + k); ++r)
        for (int64_t c = c0; c < std::min(C, c0 + k); ++c) out[c * ld + r] = P::Store(a[r * C + c]);
}

// Rows of `cols` elements from `src` (rows `src_stride` apart) into `dst` (rows `dst_stride` apart).
template <typename T>
void CopyRows(int64_t rows, int64_t cols, const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, cols * sizeof(T));
}

// The workspace (float32): the activations A (T, B, 4H), then c (T, B, H). Kept this small on purpose:
// XLA allocates it on every call, and the pages of a fresh (mmap-ed) allocation fault when first written.
int64_t WorkspaceFloats(const Shape& s) { return s.T * s.B * 5 * s.H; }

// The fused training forward (the undifferentiated one is oneDNN's primitive: faster here).
ffi::Error Fused(const Shape& s, const float* x, const float* W, const float* U, const float* b, const float* h0,
                 const float* c0, float* ys, float* hT, float* cT, float* workspace) {
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H, K = F + H;
  thread_local std::vector<float> scratch;
  // [W; U] (F + H, 4H), so that one GEMM per step, [x_t, h_{t-1}] [W; U], gives the whole
  // pre-activation, and xh, one step's [x_t, h_{t-1}].
  float* WU = Scratch(scratch, K * G + B * K);
  float* xh = WU + K * G;
  std::memcpy(WU, W, F * G * sizeof(float));
  std::memcpy(WU + F * G, U, H * G * sizeof(float));
  float* A = workspace;
  float* C = A + T * B * G;
  for (int64_t t = 0; t < T; ++t) {
    float* z = A + t * B * G;
    CopyRows(B, F, x + t * B * F, F, xh, K);
    CopyRows(B, H, t == 0 ? h0 : ys + (t - 1) * B * H, H, xh + F, K);
    if (!Gemm('N', 'N', B, G, K, xh, K, WU, G, 0.f, z, G)) return Fail("[x, h] [W; U] failed");
    ForwardStep<Fp32>(B, H, z, nullptr, b, t == 0 ? c0 : C + (t - 1) * B * H, C + t * B * H, ys + t * B * H);
  }
  std::memcpy(hT, ys + (T - 1) * B * H, B * H * sizeof(float));
  std::memcpy(cT, C + (T - 1) * B * H, B * H * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                       ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT, ffi::ResultBuffer<ffi::F32> cT,
                       ffi::ResultBuffer<ffi::U8> workspace) {
  Shape s = ShapeOf(x, U);
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (workspace->size_bytes() != static_cast<size_t>(WorkspaceFloats(s)) * sizeof(float))
    return Fail("workspace size mismatch");
  return Fused(s, x.typed_data(), W.typed_data(), U.typed_data(), b.typed_data(), h0.typed_data(), c0.typed_data(),
               ys->typed_data(), hT->typed_data(), cT->typed_data(),
               reinterpret_cast<float*>(workspace->untyped_data()));
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> ys, ffi::Buffer<ffi::F32> hT, ffi::Buffer<ffi::F32> cT,
                        ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dhT,
                        ffi::Buffer<ffi::F32> dcT, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dW,
                        ffi::ResultBuffer<ffi::F32> dU, ffi::ResultBuffer<ffi::F32> db,
                        ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0) {
  Shape s = ShapeOf(x, U);
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H, K = F + H;
  if (T == 0 || B == 0) return Fail("empty sequences reach no kernel");
  if (workspace.size_bytes() != static_cast<size_t>(WorkspaceFloats(s)) * sizeof(float))
    return Fail("workspace size mismatch");
  const float* A = reinterpret_cast<const float*>(workspace.untyped_data());
  const float* C = A + T * B * G;
  thread_local std::vector<float> dz_buffer, weights;
  // dZ (T, B, 4H) and XH (T, B, F + H) = [x_t, h_{t-1}] of every step, for [dW; dU] = XH^T dZ.
  float* dZ = Scratch(dz_buffer, T * B * (G + K));
  float* XH = dZ + T * B * G;
  CopyRows(T * B, F, x.typed_data(), F, XH, K);
  CopyRows(B, H, h0.typed_data(), H, XH + F, K);
  CopyRows((T - 1) * B, H, ys.typed_data(), H, XH + B * K + F, K);
  // [W; U]^T (4H, F + H) once, so that one GEMM per step gives [dx_t, dh_{t-1}] = dz_t [W; U]^T
  // (a transposed operand would cost dnnl_sgemm a repacking on every call); then dxh, one step's
  // [dx_t, dh_{t-1}], and dWU, [dW; dU].
  float* WUt = Scratch(weights, G * K + B * K + K * G);
  float* dxh = WUt + G * K;
  float* dWU = dxh + B * K;
  Transpose<Fp32>(W.typed_data(), F, G, WUt, K);
  Transpose<Fp32>(U.typed_data(), H, G, WUt + F, K);
  float* dc = dc0->typed_data();
  float* dbias = db->typed_data();
  CopyRows(B, H, dhT.typed_data(), H, dxh + F, K);
  std::memcpy(dc, dcT.typed_data(), B * H * sizeof(float));
  std::fill(dbias, dbias + G, 0.f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* c_prev = t == 0 ? c0.typed_data() : C + (t - 1) * B * H;
    float* dz = dZ + t * B * G;
    BackwardStep<Fp32>(B, H, A + t * B * G, C + t * B * H, c_prev, dxh + F, K, dys.typed_data() + t * B * H, dc, dz,
                       dbias);
    if (!Gemm('N', 'N', B, K, G, dz, G, WUt, K, 0.f, dxh, K)) return Fail("dz [W; U]^T failed");
    CopyRows(B, F, dxh, K, dx->typed_data() + t * B * F, F);
  }
  CopyRows(B, H, dxh + F, K, dh0->typed_data(), H);
  // [dW; dU] = XH^T dZ over all steps at once.
  if (!Gemm('T', 'N', K, G, T * B, XH, K, dZ, G, 0.f, dWU, G)) return Fail("[x, h]^T dz failed");
  std::memcpy(dW->typed_data(), dWU, F * G * sizeof(float));
  std::memcpy(dU->typed_data(), dWU + F * G, H * G * sizeof(float));
  return ffi::Error::Success();
}


// ---- The bfloat16 path ----------------------------------------------------------------------
//
// `recurrent.lstm(H, dtype=jnp.bfloat16)` with float32 parameters: every GEMM takes bfloat16
// operands and accumulates in float32 (`dnnl_gemm_bf16bf16f32`, AVX512-BF16 where the CPU has it);
// the input projection x W + b is rounded to bfloat16 (as the cell's `project`), the gate
// pre-activations, the gates and c are float32, h and the outputs are bfloat16. x, h0, ys, hT, dx,
// dh0 and dys, dhT are bfloat16; W, U, b, c and their gradients float32.
//   forward   Zx = x W (all steps, one GEMM) into the workspace; per step Zh = h_{t-1} U (one GEMM)
//             and one fused loop: z = bf16(Zx_t + b) + Zh, the gates, c_t, h_t = bf16(o tanh c_t).
//   backward  as the float32 one, with the cell's roundings where the scan's derivative has them
//             (dh = bf16(bf16(dy_t) + bf16(dh_t)), dz rounded to bfloat16 for every GEMM and for
//             db, dx and dh0 rounded to bfloat16); dW and dU are single GEMMs over all steps,
//             accumulated in float32 (the scan rounds each step's term to bfloat16 first).

}  // namespace

// oneDNN exports its bfloat16 GEMM (row-major, as dnnl_sgemm) without declaring it in dnnl.h.
extern "C" dnnl_status_t dnnl_gemm_bf16bf16f32(char transa, char transb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                               float alpha, const uint16_t* A, dnnl_dim_t lda, const uint16_t* B,
                                               dnnl_dim_t ldb, float beta, float* C, dnnl_dim_t ldc);

namespace {

bool GemmBf16(char ta, char tb, int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B_,
              int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.f ? 0.f : beta * C[m * ldc + n];
    return true;
  }
  return dnnl_gemm_bf16bf16f32(ta, tb, M, N, K, 1.f, A, lda, B_, ldb, beta, C, ldc) == dnnl_success;
}

RECURRENT_CLONES void ToBf16Rows(int64_t rows, int64_t cols, const float* __restrict src, int64_t src_stride,
                                 bf16* __restrict dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) dst[r * dst_stride + k] = ToBf16(src[r * src_stride + k]);
}

// The bfloat16 forward; `workspace` as the float32 path's (the activations, then c).
ffi::Error FusedBf16(const Shape& s, const bf16* x, const float* W, const float* U, const float* b, const bf16* h0,
                     const float* c0, bf16* ys, bf16* hT, float* cT, float* workspace) {
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H;
  thread_local std::vector<bf16> weights;
  thread_local std::vector<float> step;
  bf16* Wb = Scratch(weights, (F + H) * G);
  bf16* Ub = Wb + F * G;
  ToBf16Rows(F, G, W, G, Wb, G);
  ToBf16Rows(H, G, U, G, Ub, G);
  float* zh = Scratch(step, B * G);
  float* A = workspace;
  float* C = A + T * B * G;
  if (!GemmBf16('N', 'N', T * B, G, F, x, F, Wb, G, 0.f, A, G)) return Fail("x W (bfloat16) failed");
  for (int64_t t = 0; t < T; ++t) {
    const bf16* h_prev = t == 0 ? h0 : ys + (t - 1) * B * H;
    if (!GemmBf16('N', 'N', B, G, H, h_prev, H, Ub, G, 0.f, zh, G)) return Fail("h U (bfloat16) failed");
    ForwardStep<Bf16>(B, H, A + t * B * G, zh, b, t == 0 ? c0 : C + (t - 1) * B * H, C + t * B * H, ys + t * B * H);
  }
  std::memcpy(hT, ys + (T - 1) * B * H, B * H * sizeof(bf16));
  std::memcpy(cT, C + (T - 1) * B * H, B * H * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error ForwardBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                           ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::BF16> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::ResultBuffer<ffi::BF16> ys, ffi::ResultBuffer<ffi::BF16> hT,
                           ffi::ResultBuffer<ffi::F32> cT, ffi::ResultBuffer<ffi::U8> workspace) {
  Shape s = ShapeOf(x, U);
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (workspace->size_bytes() != static_cast<size_t>(WorkspaceFloats(s)) * sizeof(float))
    return Fail("workspace size mismatch");
  return FusedBf16(s, x.typed_data(), W.typed_data(), U.typed_data(), b.typed_data(), h0.typed_data(),
                   c0.typed_data(), ys->typed_data(), hT->typed_data(), cT->typed_data(),
                   reinterpret_cast<float*>(workspace->untyped_data()));
}

// The undifferentiated bfloat16 forward: the training forward with a workspace that stays with the
// thread (oneDNN's bfloat16 LSTM primitive would not round x W + b to bfloat16 as the cell does).
ffi::Error InferenceBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                             ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::BF16> h0, ffi::Buffer<ffi::F32> c0,
                             ffi::ResultBuffer<ffi::BF16> ys, ffi::ResultBuffer<ffi::BF16> hT,
                             ffi::ResultBuffer<ffi::F32> cT) {
  Shape s = ShapeOf(x, U);
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  thread_local std::vector<float> workspace;
  return FusedBf16(s, x.typed_data(), W.typed_data(), U.typed_data(), b.typed_data(), h0.typed_data(),
                   c0.typed_data(), ys->typed_data(), hT->typed_data(), cT->typed_data(),
                   Scratch(workspace, WorkspaceFloats(s)));
}

ffi::Error BackwardBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                            ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::BF16> h0, ffi::Buffer<ffi::F32> c0,
                            ffi::Buffer<ffi::BF16> ys, ffi::Buffer<ffi::BF16> hT, ffi::Buffer<ffi::F32> cT,
                            ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::BF16> dys, ffi::Buffer<ffi::BF16> dhT,
                            ffi::Buffer<ffi::F32> dcT, ffi::ResultBuffer<ffi::BF16> dx,
                            ffi::ResultBuffer<ffi::F32> dW, ffi::ResultBuffer<ffi::F32> dU,
                            ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::BF16> dh0,
                            ffi::ResultBuffer<ffi::F32> dc0) {
  Shape s = ShapeOf(x, U);
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H, K = F + H;
  if (T == 0 || B == 0) return Fail("empty sequences reach no kernel");
  if (workspace.size_bytes() != static_cast<size_t>(WorkspaceFloats(s)) * sizeof(float))
    return Fail("workspace size mismatch");
  const float* A = reinterpret_cast<const float*>(workspace.untyped_data());
  const float* C = A + T * B * G;
  thread_local std::vector<bf16> operands;
  thread_local std::vector<float> results;
  // dZ (T, B, 4H), XH (T, B, F + H) = [x_t, h_{t-1}] and [W; U]^T (4H, F + H), in bfloat16.
  bf16* dZ = Scratch(operands, T * B * (G + K) + G * K);
  bf16* XH = dZ + T * B * G;
  bf16* WUt = XH + T * B * K;
  CopyRows(T * B, F, x.typed_data(), F, XH, K);
  CopyRows(B, H, h0.typed_data(), H, XH + F, K);
  CopyRows((T - 1) * B, H, ys.typed_data(), H, XH + B * K + F, K);
  Transpose<Bf16>(W.typed_data(), F, G, WUt, K);
  Transpose<Bf16>(U.typed_data(), H, G, WUt + F, K);
  // dxh, one step's [dx_t, dh_{t-1}] (float32), and dWU, [dW; dU].
  float* dxh = Scratch(results, B * K + K * G);
  float* dWU = dxh + B * K;
  float* dc = dc0->typed_data();
  float* dbias = db->typed_data();
  for (int64_t n = 0; n < B; ++n)
    for (int64_t j = 0; j < H; ++j) dxh[n * K + F + j] = FromBf16(dhT.typed_data()[n * H + j]);
  std::memcpy(dc, dcT.typed_data(), B * H * sizeof(float));
  std::fill(dbias, dbias + G, 0.f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* c_prev = t == 0 ? c0.typed_data() : C + (t - 1) * B * H;
    bf16* dz = dZ + t * B * G;
    BackwardStep<Bf16>(B, H, A + t * B * G, C + t * B * H, c_prev, dxh + F, K, dys.typed_data() + t * B * H, dc, dz,
                       dbias);
    if (!GemmBf16('N', 'N', B, K, G, dz, G, WUt, K, 0.f, dxh, K)) return Fail("dz [W; U]^T (bfloat16) failed");
    ToBf16Rows(B, F, dxh, K, dx->typed_data() + t * B * F, F);
  }
  ToBf16Rows(B, H, dxh + F, K, dh0->typed_data(), H);
  if (!GemmBf16('T', 'N', K, G, T * B, XH, K, dZ, G, 0.f, dWU, G)) return Fail("[x, h]^T dz (bfloat16) failed");
  std::memcpy(dW->typed_data(), dWU, F * G * sizeof(float));
  std::memcpy(dU->typed_data(), dWU + F * G, H * G * sizeof(float));
  return ffi::Error::Success();
}

}  // namespace

// The workspace's size in bytes for one shape (the Python wrapper sizes the forward's
// workspace output with it at trace time).
extern "C" int64_t recurrent_lstm_workspace_bytes(int64_t B, int64_t T, int64_t F, int64_t H) {
  return WorkspaceFloats({B, T, F, H}) * static_cast<int64_t>(sizeof(float));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentLstmForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W
                                  .Arg<ffi::Buffer<ffi::F32>>()  // U
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cT
                                  .Ret<ffi::Buffer<ffi::U8>>());  // workspace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentLstmInference, InferenceImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W
                                  .Arg<ffi::Buffer<ffi::F32>>()  // U
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hT
                                  .Ret<ffi::Buffer<ffi::F32>>());  // cT

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentLstmBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W
                                  .Arg<ffi::Buffer<ffi::F32>>()  // U
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cT
                                  .Arg<ffi::Buffer<ffi::U8>>()   // workspace
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dcT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dU
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dc0

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentLstmForwardBf16, ForwardBf16Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W
                                  .Arg<ffi::Buffer<ffi::F32>>()   // U
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // ys
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // hT
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cT
                                  .Ret<ffi::Buffer<ffi::U8>>());  // workspace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentLstmInferenceBf16, InferenceBf16Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // W
                                  .Arg<ffi::Buffer<ffi::F32>>()    // U
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()    // c0
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // ys
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // hT
                                  .Ret<ffi::Buffer<ffi::F32>>());  // cT

XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurrentLstmBackwardBf16, BackwardBf16Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // W
                                  .Arg<ffi::Buffer<ffi::F32>>()    // U
                                  .Arg<ffi::Buffer<ffi::F32>>()    // b
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()    // c0
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // ys
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // hT
                                  .Arg<ffi::Buffer<ffi::F32>>()    // cT
                                  .Arg<ffi::Buffer<ffi::U8>>()     // workspace
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // dys
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // dhT
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dcT
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dW
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dU
                                  .Ret<ffi::Buffer<ffi::F32>>()    // db
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dc0
