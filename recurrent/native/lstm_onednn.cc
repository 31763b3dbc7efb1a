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
// On x86-64 CPUs with AVX2 but not AVX-512 the float32 per-step products run on weights packed
// once per call into panels (common.h's PanelGemm) instead of dnnl_sgemm, and the products over all
// steps (x W, dx, dW, dU) on common.h's BlockedGemm.
//
// Training (oneDNN's LSTM primitive runs reference code for forward training and backward on
// CPUs, so it is not used there):
//   forward   Z = x W (all steps, one GEMM) into the workspace; per step Z_t += h_{t-1} U (one
//             GEMM) and one fused pointwise loop that adds b, applies the gates, writes c_t, h_t
//             and overwrites Z_t with the activations (i, f, g, o) the backward reads.
//   backward  per step, backwards: one fused pointwise loop gives dZ_t and dc_{t-1}, then
//             dh_{t-1} = dZ_t U^T (one GEMM); after the loop the weight gradients as single GEMMs
//             over all steps: dU = H_prev^T dZ, dW = x^T dZ, dx = dZ W^T, db = column sums of dZ.
//             The attribute need_dx false (x not differentiated: a network's data) skips dx, whose
//             result the caller then declares empty, (0,) (see BackwardAt).
// Workspace (float32): the activations A (T, B, 4H), then c (T, B, H).
//
// Groups: every operand and result may carry the same leading dims (`jax.vmap` with
// vmap_method="broadcast_all": a population of layers, both directions of a bidirectional layer,
// nested vmaps). The handlers fold them into G independent layers, each with its own W, U, b, x,
// h0, c0 and workspace, and run them in parallel OpenMP threads when G > 1 and there are at least half
// as many layers as threads (oneDNN's GEMMs then run single-threaded inside each thread: they do not
// nest parallel regions); else one after another, the GEMMs using every thread. Scratch memory is thread_local, so each thread has its own.
//
// One layer on several threads (G == 1, or layers one after another): the time loop runs inside one
// OpenMP region with the hidden units partitioned among the threads, each with its own slice of the
// weights and its own per-step GEMM, one barrier per step (see "One layer across threads" below);
// the undifferentiated float32 forward then is that loop too, not the primitive.

#include <oneapi/dnnl/dnnl.hpp>

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "common.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

using namespace recurrent_native;

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
// Its scratchpad is its own (scratchpad_mode::user), allocated once with it: oneDNN 3.2's shared
// library scratchpad crashed the primitive now and then (in copy_bias_to_ws) at B = 32, T = 128,
// F = 128, H = 256.
struct Forward {
  dnnl::lstm_forward::primitive_desc pd;
  dnnl::lstm_forward prim;
  memory scratchpad;
};

Forward& ForwardFor(const Shape& s) {
  static std::map<Shape, std::unique_ptr<Forward>> cache;
  auto& slot = cache[s];
  if (!slot) {
    Descs d = UserDescs(s);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::lstm_forward::primitive_desc pd(Engine(), dnnl::prop_kind::forward_inference,
                                          dnnl::rnn_direction::unidirectional_left2right, d.x, d.h, d.h, Any(d.W),
                                          Any(d.U), d.b, d.y, d.h, d.h, attr);
    slot.reset(new Forward{pd, dnnl::lstm_forward(pd), memory(pd.scratchpad_desc(), Engine())});
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


// Whether every operand holds G layers' worth: W, U, b, h0, c0 (and x by construction). The
// Python wrapper batches them all alike (broadcast_all); this catches any other caller.
template <typename X, typename H>
bool Consistent(const Groups& g, const X& x, const ffi::Buffer<ffi::F32>& W, const ffi::Buffer<ffi::F32>& U,
                const ffi::Buffer<ffi::F32>& b, const H& h0, const ffi::Buffer<ffi::F32>& c0) {
  const Shape& s = g.s;
  return g.Holds(x, s.T * s.B * s.F) && g.Holds(W, s.F * 4 * s.H) && g.Holds(U, s.H * 4 * s.H) &&
         g.Holds(b, 4 * s.H) && g.Holds(h0, s.B * s.H) && g.Holds(c0, s.B * s.H);
}

// One layer through oneDNN's inference primitive; the caller holds Lock().
void Primitive(const Shape& s, const float* x, const float* W, const float* U, const float* b, const float* h0,
               const float* c0, float* ys, float* hT, float* cT) {
  Forward& f = ForwardFor(s);
  Descs d = UserDescs(s);
  memory Wp = Into(Wrap(d.W, W), f.pd.weights_layer_desc());
  memory Up = Into(Wrap(d.U, U), f.pd.weights_iter_desc());
  f.prim.execute(Stream(), {{DNNL_ARG_SRC_LAYER, Wrap(d.x, x)},
                            {DNNL_ARG_SRC_ITER, Wrap(d.h, h0)},
                            {DNNL_ARG_SRC_ITER_C, Wrap(d.h, c0)},
                            {DNNL_ARG_WEIGHTS_LAYER, Wp},
                            {DNNL_ARG_WEIGHTS_ITER, Up},
                            {DNNL_ARG_BIAS, Wrap(d.b, b)},
                            {DNNL_ARG_DST_LAYER, Wrap(d.y, ys)},
                            {DNNL_ARG_DST_ITER, Wrap(d.h, hT)},
                            {DNNL_ARG_DST_ITER_C, Wrap(d.h, cT)},
                            {DNNL_ARG_SCRATCHPAD, f.scratchpad}});
  Stream().wait();
}

// How one layer's H units are split: `threads` chunks of `chunk` units (the last may be shorter),
// multiples of 16 (whole AVX-512 vectors) when there are enough units; threads == 1: not partitioned.
struct Parts {
  int threads;
  int64_t chunk;
};

Parts PartsOf(int64_t H) {
  const int64_t P = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (P < 2 || H < 2) return {1, H};
  int64_t chunk = (H + P - 1) / P;
  if (H >= 16 * P) chunk = (chunk + 15) / 16 * 16;
  return {static_cast<int>((H + chunk - 1) / chunk), chunk};
}

ffi::Error Fused(const Shape& s, const float* x, const float* W, const float* U, const float* b, const float* h0,
                 const float* c0, float* ys, float* hT, float* cT, float* workspace);
int64_t WorkspaceFloats(const Shape& s);

// The undifferentiated forward: oneDNN's inference primitive for one layer on one thread, the fused
// forward partitioned across threads (below) for one layer on several; for G > 1 layers the
// fused forward per layer in parallel threads, with a workspace that stays with the thread (the
// primitive one layer after another, under its lock, took 2.2x as long for both directions of a
// bidirectional layer at B = 32, T = 128, F = 128, H = 256 on 2 cores, 86 against 39 ms).
ffi::Error InferenceImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                         ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                         ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT,
                         ffi::ResultBuffer<ffi::F32> cT) {
  Groups gr = GroupsOf(x, U);
  const Shape s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (!Consistent(gr, x, W, U, b, h0, c0)) return Fail("operands with different leading (group) dims");
  const int64_t G4 = 4 * s.H, X = s.T * s.B * s.F, Y = s.T * s.B * s.H, N = s.B * s.H;
  const auto at = [&](int64_t g) {
    return std::make_tuple(x.typed_data() + g * X, W.typed_data() + g * s.F * G4, U.typed_data() + g * s.H * G4,
                           b.typed_data() + g * G4, h0.typed_data() + g * N, c0.typed_data() + g * N,
                           ys->typed_data() + g * Y, hT->typed_data() + g * N, cT->typed_data() + g * N);
  };
  if (gr.G > 1) {
    return ForGroups(gr.G, [&](int64_t g) {
      thread_local std::vector<float> workspace;
      auto [xg, Wg, Ug, bg, h0g, c0g, ysg, hTg, cTg] = at(g);
      return Fused(s, xg, Wg, Ug, bg, h0g, c0g, ysg, hTg, cTg, Scratch(workspace, WorkspaceFloats(s)));
    });
  }
  // One layer on several threads: the fused forward partitioned by hidden units beats the primitive
  // (B = 32, T = 128, F = 128, H = 256, 2 cores: medians 21.5-22.7 against 30.8-32.8 ms).
  if (PartsOf(s.H).threads > 1) {
    thread_local std::vector<float> workspace;
    auto [xg, Wg, Ug, bg, h0g, c0g, ysg, hTg, cTg] = at(0);
    return Fused(s, xg, Wg, Ug, bg, h0g, c0g, ysg, hTg, cTg, Scratch(workspace, WorkspaceFloats(s)));
  }
  try {
    std::lock_guard<std::mutex> guard(Lock());
    std::apply([&](auto... a) { Primitive(s, a...); }, at(0));
  } catch (const dnnl::error& e) {
    return Fail(e.what());
  }
  return ffi::Error::Success();
}

// ---- The fused training path ----------------------------------------------------------------


// One step's gates for the hidden units [u0, u1): z (B, 4H) holds [x_t, h_{t-1}] [W; U] (float32,
// unsplit), or x_t W with h_{t-1} U in zh (split: the pre-activation is P::Round(x_t W + b) + h_{t-1} U,
// as the bfloat16 cell's); zh's rows are `zh_row` apart, its gates `zh_gate`, and its first column is
// unit u0's (the partitioned loops keep only their own units' columns). z's columns of these units
// become the activations (i, f, g, o); writes c_t and h_t of these units. `__restrict`: the arrays
// never overlap, which lets the loop vectorise.
template <typename P, bool kSplit = P::kSplitGemm>
RECURRENT_CLONES void ForwardStep(int64_t B, int64_t H, int64_t u0, int64_t u1, float* __restrict z,
                                  const float* __restrict zh, int64_t zh_row, int64_t zh_gate,
                                  const float* __restrict bias, const float* __restrict c_prev, float* __restrict c,
                                  typename P::T* __restrict h) {
  const int64_t units = u1 - u0;
  for (int64_t n = 0; n < B; ++n) {
    float* __restrict zi = z + n * 4 * H + u0;
    float* __restrict zf = zi + H;
    float* __restrict zg = zf + H;
    float* __restrict zo = zg + H;
    const float* __restrict zhn = kSplit ? zh + n * zh_row : nullptr;
    const float* __restrict cp = c_prev + n * H + u0;
    float* __restrict cn = c + n * H + u0;
    typename P::T* __restrict hn = h + n * H + u0;
    const float* __restrict bi = bias + u0;
    for (int64_t j = 0; j < units; ++j) {
      float zij = zi[j] + bi[j], zfj = zf[j] + bi[H + j];
      float zgj = zg[j] + bi[2 * H + j], zoj = zo[j] + bi[3 * H + j];
      if constexpr (kSplit) {
        zij = P::Round(zij) + zhn[j];
        zfj = P::Round(zfj) + zhn[zh_gate + j];
        zgj = P::Round(zgj) + zhn[2 * zh_gate + j];
        zoj = P::Round(zoj) + zhn[3 * zh_gate + j];
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

// One step backwards for the hidden units [u0, u1): from the activations a (B, 4H), c_t, c_{t-1},
// dh = dL/dh_t from step t + 1 (rows `dh_stride` apart) plus dy = dL/dy_t, and dc = dL/dc_t (updated in
// place to dL/dc_{t-1}), these units' gate gradients dz (B, 4H), summed into db (4H). In bfloat16,
// dh = bf16(bf16(dh_t) + dy_t) and dz is stored as bfloat16, whose float32 values are summed into db.
template <typename P>
RECURRENT_CLONES void BackwardStep(int64_t B, int64_t H, int64_t u0, int64_t u1, const float* __restrict a,
                                   const float* __restrict c, const float* __restrict c_prev,
                                   const float* __restrict dh, int64_t dh_stride,
                                   const typename P::T* __restrict dy, float* __restrict dc,
                                   typename P::T* __restrict dz, float* __restrict db) {
  using T = typename P::T;
  const int64_t units = u1 - u0;
  float* __restrict dbi = db + u0;
  for (int64_t n = 0; n < B; ++n) {
    const float* __restrict ai = a + n * 4 * H + u0;
    const float* __restrict af = ai + H;
    const float* __restrict ag = af + H;
    const float* __restrict ao = ag + H;
    const float* __restrict cn = c + n * H + u0;
    const float* __restrict cp = c_prev + n * H + u0;
    const float* __restrict dhn = dh + n * dh_stride + u0;
    const T* __restrict dyn = dy + n * H + u0;
    float* __restrict dcn = dc + n * H + u0;
    T* __restrict di = dz + n * 4 * H + u0;
    T* __restrict df = di + H;
    T* __restrict dg = df + H;
    T* __restrict dO = dg + H;
    for (int64_t j = 0; j < units; ++j) {
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
    for (int64_t q = 0; q < 4; ++q)
      for (int64_t j = 0; j < units; ++j) dbi[q * H + j] += P::Load(di[q * H + j]);
  }
}

// The workspace (float32): the activations A (T, B, 4H), then c (T, B, H). Kept this small on purpose:
// XLA allocates it on every call, and the pages of a fresh (mmap-ed) allocation fault when first written.
int64_t WorkspaceFloats(const Shape& s) { return s.T * s.B * 5 * s.H; }

// ---- One layer across threads: the hidden units partitioned ----------------------------------
//
// One layer's per-step GEMMs (B rows) are too small for oneDNN to split across threads with any gain
// (measured: 2 threads trained no faster than 1 at B = 32, H = 256). So one layer (when not already
// inside a parallel region, e.g. ForGroups') runs its time loop inside one OpenMP region instead: each
// thread owns a contiguous chunk [u0, u1) of the hidden units, packs its own slice of the weights once
// per call, and per step runs its own single-threaded GEMM (oneDNN's GEMM does not nest parallel
// regions) and the pointwise loops for its units, in the unpartitioned layouts (the workspace and the
// gradients are the same whether partitioned or not); one barrier per step makes h_t (forward) or
// dz_t (backward) whole before the next step's GEMM reads it. The big GEMMs over all steps (x W,
// dx, dW, dU) stay outside the region, where oneDNN uses every thread.

inline bool GemmOf(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B_,
                   int64_t ldb, float beta, float* C, int64_t ldc) {
  return Gemm(ta, tb, M, N, K, A, lda, B_, ldb, beta, C, ldc);
}

inline bool GemmOf(char ta, char tb, int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B_,
                   int64_t ldb, float beta, float* C, int64_t ldc) {
  return GemmBf16(ta, tb, M, N, K, A, lda, B_, ldb, beta, C, ldc);
}

// The right operand of a per-step product: a K x N matrix, the same at every step of a call, made
// once per call. Where UsePanels() (float32 on AVX2 CPUs) it is packed into panels for PanelGemm;
// else it is stored row-major (as T) for oneDNN's GEMM. `at(k, c)` is its entry (k, c) (float32),
// `dense(out)` writes it row-major into out (each site's fastest way: copies, blocked transposes).
template <typename T>
class StepWeights {
 public:
  template <typename At, typename Dense>
  StepWeights(int64_t K, int64_t N, std::vector<T>& dense_storage, std::vector<float>& panel_storage, const At& at,
              const Dense& dense)
      : K_(K), N_(N), panels_(std::is_same_v<T, float> && UsePanels()) {
    if (panels_) {
      packed_ = Scratch(panel_storage, PanelFloats(K, N));
      PackPanels(K, N, at, packed_);
    } else {
      dense_ = Scratch(dense_storage, K * N);
      dense(dense_);
    }
  }

  // Row-major C (M, N) = A (M, K; rows lda apart) times the matrix; false where oneDNN's GEMM failed.
  bool Times(int64_t M, const T* A, int64_t lda, float* C, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (panels_) {
        PanelGemm(M, N_, K_, A, lda, packed_, C, ldc);
        return true;
      }
    }
    return GemmOf('N', 'N', M, N_, K_, A, lda, dense_, N_, 0.f, C, ldc);
  }

 private:
  int64_t K_, N_;
  bool panels_;
  float* packed_ = nullptr;
  T* dense_ = nullptr;
};

// The weight gradients over all steps from dZ (T, B, 4H): dW = x^T dZ and dU = H_prev^T dZ, with
// H_prev = [h0; ys_0 .. ys_{T-2}], straight from the operands. In float32 on AVX2 CPUs (UsePanels)
// one blocked product [x, H_prev]^T dZ whose rows land in dW and dU (common.h's BlockedGemm); else
// two oneDNN GEMMs (h0's step, then the others'), not one [x, h]^T dZ into [dW; dU]: oneDNN ran that
// one at 47 against 61 GFLOP/s for its two halves (B = 32, T = 128, F + H = 128 + 256, 2 AVX2 cores:
// 68 against 17 + 35 ms), and no [x_t, h_{t-1}] copy of every step is needed.
template <typename V>
bool WeightGrads(const Shape& s, const V* x, const V* h0, const V* ys, const V* dZ, float* dW, float* dU) {
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H;
  if constexpr (std::is_same_v<V, float>) {
    if (UsePanels()) {
      // [dW; dU] = [x, H_prev]^T dZ as one product, whose rows land in dW and dU.
      BlockedGemm(
          F + H, G, T * B,
          [&](int64_t m, int64_t k) {
            return m < F ? x[k * F + m] : (k < B ? h0[k * H + m - F] : ys[(k - B) * H + m - F]);
          },
          dZ, G, [&](int64_t m) { return m < F ? dW + m * G : dU + (m - F) * G; }, false);
      return true;
    }
  }
  return GemmOf('T', 'N', F, G, T * B, x, F, dZ, G, 0.f, dW, G) &&
         GemmOf('T', 'N', H, G, B, h0, H, dZ, G, 0.f, dU, G) &&
         GemmOf('T', 'N', H, G, (T - 1) * B, ys, H, dZ + B * G, G, 1.f, dU, G);
}

// The forward partitioned (float32 or bfloat16): Zx = x W (all steps, one GEMM, every thread) into
// the workspace; per step each thread's Zh = h_{t-1} U[:, its gate columns] and its units' gates.
// float32 thus sums x_t W + b + h_{t-1} U in another order than the unpartitioned single GEMM.
template <typename P>
ffi::Error FusedParts(const Shape& s, const Parts& parts, const typename P::T* x, const float* W, const float* U,
                      const float* b, const typename P::T* h0, const float* c0, typename P::T* ys,
                      typename P::T* hT, float* cT, float* workspace) {
  using V = typename P::T;
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H;
  float* A = workspace;
  float* C = A + T * B * G;
  bool ok;
  if constexpr (std::is_same_v<V, float>) {
    if (UsePanels()) {
      BlockedGemm(
          T * B, G, F, [&](int64_t m, int64_t k) { return x[m * F + k]; }, W, G,
          [&](int64_t m) { return A + m * G; }, false);
      ok = true;
    } else {
      ok = Gemm('N', 'N', T * B, G, F, x, F, W, G, 0.f, A, G);
    }
  } else {
    thread_local std::vector<bf16> weights;
    bf16* Wb = Scratch(weights, F * G);
    ToBf16Rows(F, G, W, G, Wb, G);
    ok = GemmBf16('N', 'N', T * B, G, F, x, F, Wb, G, 0.f, A, G);
  }
  if (!ok) return Fail("x W failed");
  bool failed = false;
#pragma omp parallel num_threads(parts.threads)
  {
    const int64_t u0 = std::min<int64_t>(H, omp_get_thread_num() * parts.chunk);
    const int64_t u1 = std::min(H, u0 + parts.chunk), n = u1 - u0;
    // Up (H, 4n): this thread's columns {g H + u : g = i, f, g, o; u in [u0, u1)} of U; zh (B, 4n).
    const auto column = [&](int64_t k, int64_t c) { return U[k * G + (c / n) * H + u0 + c % n]; };
    thread_local std::vector<V> packed;
    thread_local std::vector<float> panels;
    thread_local std::vector<float> step;
    const StepWeights<V> Up(H, 4 * n, packed, panels, column, [&](V* out) {
      for (int64_t k = 0; k < H; ++k)
        for (int64_t c = 0; c < 4 * n; ++c) out[k * 4 * n + c] = P::Store(column(k, c));
    });
    float* zh = Scratch(step, B * 4 * n);
    for (int64_t t = 0; t < T; ++t) {
      const V* h_prev = t == 0 ? h0 : ys + (t - 1) * B * H;
      if (!Up.Times(B, h_prev, H, zh, 4 * n)) {
#pragma omp atomic write
        failed = true;
      }
      ForwardStep<P, true>(B, H, u0, u1, A + t * B * G, zh, 4 * n, n, b, t == 0 ? c0 : C + (t - 1) * B * H,
                           C + t * B * H, ys + t * B * H);
#pragma omp barrier
    }
  }
  if (failed) return Fail("h U (partitioned) failed");
  std::memcpy(hT, ys + (T - 1) * B * H, B * H * sizeof(V));
  std::memcpy(cT, C + (T - 1) * B * H, B * H * sizeof(float));
  return ffi::Error::Success();
}

// The fused training forward (also the undifferentiated one, with a workspace of the thread's own,
// where it runs partitioned; on one thread that one is oneDNN's primitive: faster there).
ffi::Error Fused(const Shape& s, const float* x, const float* W, const float* U, const float* b, const float* h0,
                 const float* c0, float* ys, float* hT, float* cT, float* workspace) {
  if (const Parts parts = PartsOf(s.H); parts.threads > 1)
    return FusedParts<Fp32>(s, parts, x, W, U, b, h0, c0, ys, hT, cT, workspace);
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H, K = F + H;
  thread_local std::vector<float> dense, panels, scratch;
  // [W; U] (F + H, 4H), so that one GEMM per step, [x_t, h_{t-1}] [W; U], gives the whole
  // pre-activation, and xh, one step's [x_t, h_{t-1}].
  const StepWeights<float> WU(
      K, G, dense, panels, [&](int64_t k, int64_t c) { return k < F ? W[k * G + c] : U[(k - F) * G + c]; },
      [&](float* out) {
        std::memcpy(out, W, F * G * sizeof(float));
        std::memcpy(out + F * G, U, H * G * sizeof(float));
      });
  float* xh = Scratch(scratch, B * K);
  float* A = workspace;
  float* C = A + T * B * G;
  for (int64_t t = 0; t < T; ++t) {
    float* z = A + t * B * G;
    CopyRows(B, F, x + t * B * F, F, xh, K);
    CopyRows(B, H, t == 0 ? h0 : ys + (t - 1) * B * H, H, xh + F, K);
    if (!WU.Times(B, xh, K, z, G)) return Fail("[x, h] [W; U] failed");
    ForwardStep<Fp32>(B, H, 0, H, z, nullptr, 0, 0, b, t == 0 ? c0 : C + (t - 1) * B * H, C + t * B * H, ys + t * B * H);
  }
  std::memcpy(hT, ys + (T - 1) * B * H, B * H * sizeof(float));
  std::memcpy(cT, C + (T - 1) * B * H, B * H * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                       ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT, ffi::ResultBuffer<ffi::F32> cT,
                       ffi::ResultBuffer<ffi::U8> workspace) {
  Groups gr = GroupsOf(x, U);
  const Shape s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (!Consistent(gr, x, W, U, b, h0, c0)) return Fail("operands with different leading (group) dims");
  const int64_t WS = WorkspaceFloats(s);
  if (workspace->size_bytes() != static_cast<size_t>(gr.G * WS) * sizeof(float))
    return Fail("workspace size mismatch");
  const int64_t G4 = 4 * s.H, X = s.T * s.B * s.F, Y = s.T * s.B * s.H, N = s.B * s.H;
  float* ws = reinterpret_cast<float*>(workspace->untyped_data());
  return ForGroups(gr.G, [&](int64_t g) {
    return Fused(s, x.typed_data() + g * X, W.typed_data() + g * s.F * G4, U.typed_data() + g * s.H * G4,
                 b.typed_data() + g * G4, h0.typed_data() + g * N, c0.typed_data() + g * N, ys->typed_data() + g * Y,
                 hT->typed_data() + g * N, cT->typed_data() + g * N, ws + g * WS);
  });
}

// Pointers to one layer's operands and results of a backward call (float32 or bfloat16 T).
template <typename T>
struct BackwardArgs {
  const T* x;
  const float *W, *U, *b;
  const T* h0;
  const float* c0;
  const T* ys;
  const float* workspace;
  const T *dys, *dhT;
  const float* dcT;
  T* dx;  // nullptr: dx is not wanted (need_dx false), and not computed
  float *dW, *dU, *db;
  T* dh0;
  float* dc0;
};

// Layer g's pointers of a backward call's buffers. Without need_dx, dx is nullptr: the caller
// declares that result empty, (0,) (under vmap (..., 0)), so that XLA allocates no T B F buffer
// the kernel would leave unwritten.
template <ffi::DataType D, typename T = ffi::NativeType<D>>
BackwardArgs<T> BackwardAt(const Shape& s, int64_t g, bool need_dx, ffi::Buffer<D>& x, ffi::Buffer<ffi::F32>& W,
                           ffi::Buffer<ffi::F32>& U, ffi::Buffer<ffi::F32>& b, ffi::Buffer<D>& h0,
                           ffi::Buffer<ffi::F32>& c0, ffi::Buffer<D>& ys, ffi::Buffer<ffi::U8>& workspace,
                           ffi::Buffer<D>& dys, ffi::Buffer<D>& dhT, ffi::Buffer<ffi::F32>& dcT,
                           ffi::ResultBuffer<D>& dx, ffi::ResultBuffer<ffi::F32>& dW,
                           ffi::ResultBuffer<ffi::F32>& dU, ffi::ResultBuffer<ffi::F32>& db,
                           ffi::ResultBuffer<D>& dh0, ffi::ResultBuffer<ffi::F32>& dc0) {
  const int64_t G4 = 4 * s.H, X = s.T * s.B * s.F, Y = s.T * s.B * s.H, N = s.B * s.H;
  const float* ws = reinterpret_cast<const float*>(workspace.untyped_data()) + g * WorkspaceFloats(s);
  return {x.typed_data() + g * X,   W.typed_data() + g * s.F * G4, U.typed_data() + g * s.H * G4,
          b.typed_data() + g * G4,  h0.typed_data() + g * N,       c0.typed_data() + g * N,
          ys.typed_data() + g * Y,  ws,                            dys.typed_data() + g * Y,
          dhT.typed_data() + g * N, dcT.typed_data() + g * N,      need_dx ? dx->typed_data() + g * X : nullptr,
          dW->typed_data() + g * s.F * G4, dU->typed_data() + g * s.H * G4, db->typed_data() + g * G4,
          dh0->typed_data() + g * N, dc0->typed_data() + g * N};
}

// The backward partitioned (float32 or bfloat16): per step each thread's units' dz_t, a barrier,
// then dh_{t-1}[:, its units] = dz_t U[its units, :]^T (the GEMM partitioned by output columns; the
// next step's pointwise loop reads only these columns, and dz_{t-1} is other memory than dz_t, so one
// barrier per step suffices); after the loop dx = dZ W^T (where wanted) and the weight gradients
// over all steps.
template <typename P>
ffi::Error BackwardParts(const Shape& s, const Parts& parts, const BackwardArgs<typename P::T>& a) {
  using V = typename P::T;
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H;
  const float* A = a.workspace;
  const float* C = A + T * B * G;
  thread_local std::vector<V> operands;
  thread_local std::vector<float> results;
  // dZ (T, B, 4H) and, for dx, W^T (4H, F).
  const bool need_dx = a.dx != nullptr;
  V* dZ = Scratch(operands, T * B * G + (need_dx ? G * F : 0));
  V* Wt = dZ + T * B * G;
  if (need_dx) Transpose<P>(a.W, F, G, Wt, F);
  // dh (B, H), one step's dL/dh (float32), and (bfloat16) dx in float32.
  constexpr bool kF32 = std::is_same_v<V, float>;
  float* dh = Scratch(results, B * H + (kF32 || !need_dx ? 0 : T * B * F));
  for (int64_t i = 0; i < B * H; ++i) dh[i] = P::Load(a.dhT[i]);
  float* dc = a.dc0;
  float* dbias = a.db;
  std::memcpy(dc, a.dcT, B * H * sizeof(float));
  std::fill(dbias, dbias + G, 0.f);
  bool failed = false;
#pragma omp parallel num_threads(parts.threads)
  {
    const int64_t u0 = std::min<int64_t>(H, omp_get_thread_num() * parts.chunk);
    const int64_t u1 = std::min(H, u0 + parts.chunk), n = u1 - u0;
    // Ut (4H, n) = U[u0:u1, :]^T, this thread's output columns of dh = dz U^T.
    thread_local std::vector<V> packed;
    thread_local std::vector<float> panels;
    const StepWeights<V> Ut(
        G, n, packed, panels, [&](int64_t k, int64_t c) { return a.U[(u0 + c) * G + k]; },
        [&](V* out) { Transpose<P>(a.U + u0 * G, n, G, out, n); });
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* c_prev = t == 0 ? a.c0 : C + (t - 1) * B * H;
      V* dz = dZ + t * B * G;
      BackwardStep<P>(B, H, u0, u1, A + t * B * G, C + t * B * H, c_prev, dh, H, a.dys + t * B * H, dc, dz, dbias);
#pragma omp barrier
      if (!Ut.Times(B, dz, G, dh + u0, H)) {
#pragma omp atomic write
        failed = true;
      }
    }
  }
  if (failed) return Fail("dz U^T (partitioned) failed");
  for (int64_t i = 0; i < B * H; ++i) a.dh0[i] = P::Store(dh[i]);
  if (need_dx) {
    if constexpr (kF32) {
      if (UsePanels()) {
        BlockedGemm(
            T * B, F, G, [&](int64_t m, int64_t k) { return dZ[m * G + k]; }, Wt, F,
            [&](int64_t m) { return a.dx + m * F; }, false);
      } else if (!Gemm('N', 'N', T * B, F, G, dZ, G, Wt, F, 0.f, a.dx, F)) {
        return Fail("dz W^T failed");
      }
    } else {
      float* dX = dh + B * H;
      if (!GemmBf16('N', 'N', T * B, F, G, dZ, G, Wt, F, 0.f, dX, F)) return Fail("dz W^T (bfloat16) failed");
      ToBf16Rows(T * B, F, dX, F, a.dx, F);
    }
  }
  if (!WeightGrads(s, a.x, a.h0, a.ys, dZ, a.dW, a.dU)) return Fail("x^T dz, h^T dz failed");
  return ffi::Error::Success();
}

ffi::Error Backward(const Shape& s, const BackwardArgs<float>& a) {
  if (const Parts parts = PartsOf(s.H); parts.threads > 1) return BackwardParts<Fp32>(s, parts, a);
  // Fx: dx's columns of the per-step product, none where dx is not wanted (the product is then
  // dh_{t-1} = dz_t U^T alone).
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H, Fx = a.dx != nullptr ? F : 0, K = Fx + H;
  const float* A = a.workspace;
  const float* C = A + T * B * G;
  thread_local std::vector<float> dz_buffer, dense, panels, step;
  // dZ (T, B, 4H) of every step, for the weight gradients.
  float* dZ = Scratch(dz_buffer, T * B * G);
  // [W; U]^T (4H, Fx + H) once, so that one GEMM per step gives [dx_t, dh_{t-1}] = dz_t [W; U]^T
  // (a transposed operand would cost dnnl_sgemm a repacking on every call); then dxh, one step's
  // [dx_t, dh_{t-1}].
  const StepWeights<float> WUt(
      G, K, dense, panels, [&](int64_t k, int64_t c) { return c < Fx ? a.W[c * G + k] : a.U[(c - Fx) * G + k]; },
      [&](float* out) {
        Transpose<Fp32>(a.W, Fx, G, out, K);
        Transpose<Fp32>(a.U, H, G, out + Fx, K);
      });
  float* dxh = Scratch(step, B * K);
  float* dc = a.dc0;
  float* dbias = a.db;
  CopyRows(B, H, a.dhT, H, dxh + Fx, K);
  std::memcpy(dc, a.dcT, B * H * sizeof(float));
  std::fill(dbias, dbias + G, 0.f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* c_prev = t == 0 ? a.c0 : C + (t - 1) * B * H;
    float* dz = dZ + t * B * G;
    BackwardStep<Fp32>(B, H, 0, H, A + t * B * G, C + t * B * H, c_prev, dxh + Fx, K, a.dys + t * B * H, dc, dz,
                       dbias);
    if (!WUt.Times(B, dz, G, dxh, K)) return Fail("dz [W; U]^T failed");
    if (Fx > 0) CopyRows(B, F, dxh, K, a.dx + t * B * F, F);
  }
  CopyRows(B, H, dxh + Fx, K, a.dh0, H);
  if (!WeightGrads(s, a.x, a.h0, a.ys, dZ, a.dW, a.dU)) return Fail("x^T dz, h^T dz failed");
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> ys, ffi::Buffer<ffi::F32> hT, ffi::Buffer<ffi::F32> cT,
                        ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dhT,
                        ffi::Buffer<ffi::F32> dcT, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dW,
                        ffi::ResultBuffer<ffi::F32> dU, ffi::ResultBuffer<ffi::F32> db,
                        ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0, bool need_dx) {
  Groups gr = GroupsOf(x, U);
  const Shape s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (!Consistent(gr, x, W, U, b, h0, c0)) return Fail("operands with different leading (group) dims");
  if (workspace.size_bytes() != static_cast<size_t>(gr.G * WorkspaceFloats(s)) * sizeof(float))
    return Fail("workspace size mismatch");
  if (!gr.Holds(*dx, need_dx ? s.T * s.B * s.F : 0)) return Fail("dx result size mismatch");
  return ForGroups(gr.G, [&](int64_t g) {
    return Backward(s, BackwardAt(s, g, need_dx, x, W, U, b, h0, c0, ys, workspace, dys, dhT, dcT, dx, dW, dU, db,
                                  dh0, dc0));
  });
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


// The bfloat16 forward; `workspace` as the float32 path's (the activations, then c).
ffi::Error FusedBf16(const Shape& s, const bf16* x, const float* W, const float* U, const float* b, const bf16* h0,
                     const float* c0, bf16* ys, bf16* hT, float* cT, float* workspace) {
  if (const Parts parts = PartsOf(s.H); parts.threads > 1)
    return FusedParts<Bf16>(s, parts, x, W, U, b, h0, c0, ys, hT, cT, workspace);
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
    ForwardStep<Bf16>(B, H, 0, H, A + t * B * G, zh, G, H, b, t == 0 ? c0 : C + (t - 1) * B * H, C + t * B * H, ys + t * B * H);
  }
  std::memcpy(hT, ys + (T - 1) * B * H, B * H * sizeof(bf16));
  std::memcpy(cT, C + (T - 1) * B * H, B * H * sizeof(float));
  return ffi::Error::Success();
}

ffi::Error ForwardBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                           ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::BF16> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::ResultBuffer<ffi::BF16> ys, ffi::ResultBuffer<ffi::BF16> hT,
                           ffi::ResultBuffer<ffi::F32> cT, ffi::ResultBuffer<ffi::U8> workspace) {
  Groups gr = GroupsOf(x, U);
  const Shape s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (!Consistent(gr, x, W, U, b, h0, c0)) return Fail("operands with different leading (group) dims");
  const int64_t WS = WorkspaceFloats(s);
  if (workspace->size_bytes() != static_cast<size_t>(gr.G * WS) * sizeof(float))
    return Fail("workspace size mismatch");
  const int64_t G4 = 4 * s.H, X = s.T * s.B * s.F, Y = s.T * s.B * s.H, N = s.B * s.H;
  float* ws = reinterpret_cast<float*>(workspace->untyped_data());
  return ForGroups(gr.G, [&](int64_t g) {
    return FusedBf16(s, x.typed_data() + g * X, W.typed_data() + g * s.F * G4, U.typed_data() + g * s.H * G4,
                     b.typed_data() + g * G4, h0.typed_data() + g * N, c0.typed_data() + g * N,
                     ys->typed_data() + g * Y, hT->typed_data() + g * N, cT->typed_data() + g * N, ws + g * WS);
  });
}

// The undifferentiated bfloat16 forward: the training forward with a workspace that stays with the
// thread (oneDNN's bfloat16 LSTM primitive would not round x W + b to bfloat16 as the cell does).
ffi::Error InferenceBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                             ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::BF16> h0, ffi::Buffer<ffi::F32> c0,
                             ffi::ResultBuffer<ffi::BF16> ys, ffi::ResultBuffer<ffi::BF16> hT,
                             ffi::ResultBuffer<ffi::F32> cT) {
  Groups gr = GroupsOf(x, U);
  const Shape s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (!Consistent(gr, x, W, U, b, h0, c0)) return Fail("operands with different leading (group) dims");
  const int64_t G4 = 4 * s.H, X = s.T * s.B * s.F, Y = s.T * s.B * s.H, N = s.B * s.H;
  return ForGroups(gr.G, [&](int64_t g) {
    thread_local std::vector<float> workspace;  // one per thread: each runs one layer at a time
    return FusedBf16(s, x.typed_data() + g * X, W.typed_data() + g * s.F * G4, U.typed_data() + g * s.H * G4,
                     b.typed_data() + g * G4, h0.typed_data() + g * N, c0.typed_data() + g * N,
                     ys->typed_data() + g * Y, hT->typed_data() + g * N, cT->typed_data() + g * N,
                     Scratch(workspace, WorkspaceFloats(s)));
  });
}

ffi::Error BackwardBf16(const Shape& s, const BackwardArgs<bf16>& a);

ffi::Error BackwardBf16Impl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                            ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::BF16> h0, ffi::Buffer<ffi::F32> c0,
                            ffi::Buffer<ffi::BF16> ys, ffi::Buffer<ffi::BF16> hT, ffi::Buffer<ffi::F32> cT,
                            ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::BF16> dys, ffi::Buffer<ffi::BF16> dhT,
                            ffi::Buffer<ffi::F32> dcT, ffi::ResultBuffer<ffi::BF16> dx,
                            ffi::ResultBuffer<ffi::F32> dW, ffi::ResultBuffer<ffi::F32> dU,
                            ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::BF16> dh0,
                            ffi::ResultBuffer<ffi::F32> dc0, bool need_dx) {
  Groups gr = GroupsOf(x, U);
  const Shape s = gr.s;
  if (s.T == 0 || s.B == 0) return Fail("empty sequences reach no kernel");
  if (!Consistent(gr, x, W, U, b, h0, c0)) return Fail("operands with different leading (group) dims");
  if (workspace.size_bytes() != static_cast<size_t>(gr.G * WorkspaceFloats(s)) * sizeof(float))
    return Fail("workspace size mismatch");
  if (!gr.Holds(*dx, need_dx ? s.T * s.B * s.F : 0)) return Fail("dx result size mismatch");
  return ForGroups(gr.G, [&](int64_t g) {
    return BackwardBf16(s, BackwardAt(s, g, need_dx, x, W, U, b, h0, c0, ys, workspace, dys, dhT, dcT, dx, dW, dU,
                                      db, dh0, dc0));
  });
}

ffi::Error BackwardBf16(const Shape& s, const BackwardArgs<bf16>& a) {
  if (const Parts parts = PartsOf(s.H); parts.threads > 1) return BackwardParts<Bf16>(s, parts, a);
  // Fx: dx's columns of the per-step product, none where dx is not wanted (as the float32 Backward).
  const int64_t B = s.B, T = s.T, F = s.F, H = s.H, G = 4 * H, Fx = a.dx != nullptr ? F : 0, K = Fx + H;
  const float* A = a.workspace;
  const float* C = A + T * B * G;
  thread_local std::vector<bf16> operands;
  thread_local std::vector<float> results;
  // dZ (T, B, 4H) and [W; U]^T (4H, Fx + H), in bfloat16.
  bf16* dZ = Scratch(operands, T * B * G + G * K);
  bf16* WUt = dZ + T * B * G;
  Transpose<Bf16>(a.W, Fx, G, WUt, K);
  Transpose<Bf16>(a.U, H, G, WUt + Fx, K);
  // dxh, one step's [dx_t, dh_{t-1}] (float32).
  float* dxh = Scratch(results, B * K);
  float* dc = a.dc0;
  float* dbias = a.db;
  for (int64_t n = 0; n < B; ++n)
    for (int64_t j = 0; j < H; ++j) dxh[n * K + Fx + j] = FromBf16(a.dhT[n * H + j]);
  std::memcpy(dc, a.dcT, B * H * sizeof(float));
  std::fill(dbias, dbias + G, 0.f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* c_prev = t == 0 ? a.c0 : C + (t - 1) * B * H;
    bf16* dz = dZ + t * B * G;
    BackwardStep<Bf16>(B, H, 0, H, A + t * B * G, C + t * B * H, c_prev, dxh + Fx, K, a.dys + t * B * H, dc, dz,
                       dbias);
    if (!GemmBf16('N', 'N', B, K, G, dz, G, WUt, K, 0.f, dxh, K)) return Fail("dz [W; U]^T (bfloat16) failed");
    if (Fx > 0) ToBf16Rows(B, F, dxh, K, a.dx + t * B * F, F);
  }
  ToBf16Rows(B, H, dxh + Fx, K, a.dh0, H);
  if (!WeightGrads(s, a.x, a.h0, a.ys, dZ, a.dW, a.dU)) return Fail("x^T dz, h^T dz (bfloat16) failed");
  return ffi::Error::Success();
}

}  // namespace

// The workspace's size in bytes for one shape (the Python wrapper sizes the forward's
// workspace output with it at trace time).
// 1 where the bfloat16 kernels run oneDNN's bfloat16 GEMM, 0 where they widen its operands to float32.
extern "C" int64_t recurrent_bf16_gemm() { return HasBf16Gemm() ? 1 : 0; }

// 1 where the float32 per-step products run on packed panels (AVX2 CPUs), 0 where on oneDNN's GEMM.
extern "C" int64_t recurrent_step_panels() { return UsePanels() ? 1 : 0; }

// Row-major C (M, N) = op(A) B (beta 0) or op(A) B + C (beta 1) through the blocked GEMM of common.h,
// op(A) = A (M, K; rows lda apart; transa 'N') or A^T (A: K, M; 'T'): for its tests and benchmark.
// Returns 0, or -1 where the CPU lacks AVX2 and FMA.
extern "C" int64_t recurrent_blocked_gemm(char transa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (!HasAvx2Fma()) return -1;
  const auto row = [&](int64_t m) { return C + m * ldc; };
  if (transa == 'T')
    BlockedGemm(M, N, K, [&](int64_t m, int64_t k) { return A[k * lda + m]; }, B, ldb, row, beta != 0.f);
  else
    BlockedGemm(M, N, K, [&](int64_t m, int64_t k) { return A[m * lda + k]; }, B, ldb, row, beta != 0.f);
  return 0;
#else
  return -1;
#endif
}

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
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Attr<bool>("need_dx"));

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
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dc0
                                  .Attr<bool>("need_dx"));
