// What the native kernels share: one layer's shape and the folding of a call's leading (group)
// dims into independent layers run by ForGroups, oneDNN's float32 and bfloat16 GEMMs, the
// vectorisable pointwise functions (exp, sigmoid, tanh), bfloat16 rounding, the
// storage-and-rounding policies (Fp32, Bf16) the fused loops are written over, per-thread scratch
// and row copies.
#pragma once

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

// oneDNN exports its bfloat16 GEMM (row-major, as dnnl_sgemm) without declaring it in dnnl.h.
extern "C" dnnl_status_t dnnl_gemm_bf16bf16f32(char transa, char transb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                               float alpha, const uint16_t* A, dnnl_dim_t lda, const uint16_t* B,
                                               dnnl_dim_t ldb, float beta, float* C, dnnl_dim_t ldc);

namespace recurrent_native {
// Internal linkage in each kernel's translation unit (so that target_clones makes one set per file).
namespace {

namespace ffi = xla::ffi;

inline ffi::Error Fail(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal, "recurrent native kernel: " + what);
}

// One layer: batch, steps, input features, hidden units (a std::map key for the LSTM's primitives).
struct Shape {
  int64_t B, T, F, H;
  bool operator<(const Shape& o) const { return std::tie(B, T, F, H) < std::tie(o.B, o.T, o.F, o.H); }
};

// Groups: every operand and result of a call may carry the same leading dims (`jax.vmap` with
// vmap_method="broadcast_all": a population of layers, both directions of a bidirectional layer,
// nested vmaps). A call's layers are the shape of each and how many (the product of x's leading
// dims); every buffer holds the G layers' parts one after another.
struct Groups {
  Shape s;
  int64_t G;

  // Whether `buffer` holds G layers of `per` elements each.
  template <typename Buffer>
  bool Holds(const Buffer& buffer, int64_t per) const {
    return buffer.element_count() == static_cast<size_t>(G * per);
  }
};

// The layers of a call with x (..., T, B, F) and U (..., H, kH).
template <typename X, typename U>
Groups GroupsOf(const X& x, const U& u) {
  auto xd = x.dimensions();
  auto ud = u.dimensions();
  const size_t r = xd.size();
  int64_t G = 1;
  for (size_t i = 0; i + 3 < r; ++i) G *= xd[i];
  return {{xd[r - 2], xd[r - 3], xd[r - 1], ud[ud.size() - 2]}, G};
}

// run(g) for each of G layers: one after another, oneDNN's GEMMs using every thread, when there are
// fewer than half as many layers as threads (each layer in a thread of its own would leave its GEMMs
// one thread; measured on 2 cores only, where G >= 1 layer per core always runs in parallel); else in
// parallel OpenMP threads (dynamic: one layer at a time per thread; oneDNN's GEMMs then run
// single-threaded inside each: they do not nest parallel regions). Scratch memory is thread_local,
// so each thread has its own. The first failure is returned.
template <typename Run>
ffi::Error ForGroups(int64_t G, const Run& run) {
  if (G == 1) return run(0);
  if (2 * G < omp_get_max_threads()) {
    for (int64_t g = 0; g < G; ++g) {
      ffi::Error e = run(g);
      if (e.failure()) return e;
    }
    return ffi::Error::Success();
  }
  std::vector<ffi::Error> errors(G);
  // No more threads than layers: the others would only wait (and spin).
  const int threads = static_cast<int>(std::min<int64_t>(G, omp_get_max_threads()));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t g = 0; g < G; ++g) {
    try {
      errors[g] = run(g);
    } catch (const std::exception& e) {
      errors[g] = Fail(e.what());
    }
  }
  for (auto& e : errors)
    if (e.failure()) return e;
  return ffi::Error::Success();
}

// Row-major C (M, N) = alpha op(A) op(B) + beta C through oneDNN's JIT GEMM; false on failure.
inline bool Gemm(char ta, char tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B_,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return true;
  if (K == 0) {  // dnnl_sgemm may reject K = 0: C = beta C
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.f ? 0.f : beta * C[m * ldc + n];
    return true;
  }
  return dnnl_sgemm(ta, tb, M, N, K, 1.f, A, lda, B_, ldb, beta, C, ldc) == dnnl_success;
}

// ---- The per-step product on AVX2 CPUs: weight panels packed once per call ----------------
//
// A step's h_{t-1} U[:, a thread's gate columns] is a small GEMM (32 x 256 x 512 at the suite's
// shape) on the same U at every step. dnnl_sgemm takes U as it is on every call; here U is packed
// once per call into panels of 16 columns (each panel's rows contiguous), and a 6 x 16 register
// tile (12 AVX accumulators, FMA) runs down each panel. On a 2-core AVX2 AMD EPYC (Zen) that
// product took 0.23 against dnnl_sgemm's 0.26-0.29 ms. Used on x86-64 CPUs with AVX2 and FMA but
// without AVX-512, where it was measured; elsewhere oneDNN's GEMM (its AVX-512 kernels) runs.
// RECURRENT_NATIVE_GEMM=panels or =onednn picks one on any CPU (the tests run both), for these
// products and for the products over all steps (BlockedGemm, below); RECURRENT_NATIVE_STEP_GEMM is
// the same switch's older name.

// Whether the CPU runs the kernel's own AVX2 + FMA code (the panels' tile).
inline bool HasAvx2Fma() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Whether the float32 per-step product runs on packed panels (asked once).
inline bool UsePanels() {
  static const bool use = [] {
#if defined(__GNUC__) && defined(__x86_64__)
    const bool avx2 = HasAvx2Fma();
    const char* pick = std::getenv("RECURRENT_NATIVE_GEMM");
    if (pick == nullptr) pick = std::getenv("RECURRENT_NATIVE_STEP_GEMM");
    if (pick != nullptr && std::string(pick) == "panels") return avx2;
    if (pick != nullptr && std::string(pick) == "onednn") return false;
    return avx2 && !__builtin_cpu_supports("avx512f");
#else
    return false;
#endif
  }();
  return use;
}

constexpr int64_t kPanel = 16;  // columns per panel

// The floats that K x N packed into panels take (N rounded up to whole panels).
inline int64_t PanelFloats(int64_t K, int64_t N) { return (N + kPanel - 1) / kPanel * kPanel * K; }

// Packs the K x N matrix whose entry (k, c) is at(k, c) into panels of kPanel columns: panel p holds
// columns [16 p, 16 p + 16) of every row, row k at out + (p K + k) 16; columns past N are zero.
template <typename At>
void PackPanels(int64_t K, int64_t N, const At& at, float* out) {
  for (int64_t p = 0; p * kPanel < N; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = 0; l < kPanel; ++l) {
        const int64_t c = p * kPanel + l;
        out[(p * K + k) * kPanel + l] = c < N ? at(k, c) : 0.f;
      }
}

#if defined(__GNUC__) && defined(__x86_64__)
constexpr int64_t kTileRows = 6;  // rows of the register tile

// C's rows c[0:MR], columns [0, cols) (cols <= 16), = (or +=, accumulate) MR rows of A times one panel
// (K x 16), with 12 AVX accumulators and FMA. kStrip: A is a packed strip (entry (r, k) at
// a[6 k + r], BlockedGemm's); else A's rows are lda apart (entry (r, k) at a[r lda + k]).
template <int MR, bool kStrip>
__attribute__((target("avx2,fma"), always_inline)) inline void Tile(int64_t K, const float* a, int64_t lda,
                                                                     const float* panel, float* const* c,
                                                                     int64_t cols, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanel), b1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    __m256 x;
    // Named accumulators, not arrays: GCC keeps those in registers (an array spilled to the stack).
#define RECURRENT_ROW(r)                                                              \
  if constexpr (MR > r) {                                                             \
    x = _mm256_broadcast_ss(kStrip ? a + k * kTileRows + r : a + r * lda + k);        \
    c##r##0 = _mm256_fmadd_ps(x, b0, c##r##0);                                        \
    c##r##1 = _mm256_fmadd_ps(x, b1, c##r##1);                                        \
  }
    RECURRENT_ROW(0) RECURRENT_ROW(1) RECURRENT_ROW(2) RECURRENT_ROW(3) RECURRENT_ROW(4) RECURRENT_ROW(5)
#undef RECURRENT_ROW
  }
  if (cols == kPanel) {
#define RECURRENT_STORE(r)                                                                  \
  if constexpr (MR > r) {                                                                   \
    if (accumulate) {                                                                       \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(c[r]));                              \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(c[r] + 8));                          \
    }                                                                                       \
    _mm256_storeu_ps(c[r], c##r##0);                                                        \
    _mm256_storeu_ps(c[r] + 8, c##r##1);                                                    \
  }
    RECURRENT_STORE(0) RECURRENT_STORE(1) RECURRENT_STORE(2) RECURRENT_STORE(3) RECURRENT_STORE(4) RECURRENT_STORE(5)
#undef RECURRENT_STORE
    return;
  }
  alignas(32) float tile[6][kPanel];
#define RECURRENT_SPILL(r)                       \
  if constexpr (MR > r) {                        \
    _mm256_store_ps(tile[r], c##r##0);           \
    _mm256_store_ps(tile[r] + 8, c##r##1);       \
  }
  RECURRENT_SPILL(0) RECURRENT_SPILL(1) RECURRENT_SPILL(2) RECURRENT_SPILL(3) RECURRENT_SPILL(4) RECURRENT_SPILL(5)
#undef RECURRENT_SPILL
  for (int r = 0; r < MR; ++r)
    for (int64_t l = 0; l < cols; ++l) c[r][l] = accumulate ? c[r][l] + tile[r][l] : tile[r][l];
}

// Tile<rows, kStrip> for 1 <= rows <= 6 known only at run time.
template <bool kStrip>
__attribute__((target("avx2,fma"), always_inline)) inline void TileRows(int64_t rows, int64_t K, const float* a,
                                                                         int64_t lda, const float* panel,
                                                                         float* const* c, int64_t cols,
                                                                         bool accumulate) {
  switch (rows) {
    case 6: Tile<6, kStrip>(K, a, lda, panel, c, cols, accumulate); break;
    case 5: Tile<5, kStrip>(K, a, lda, panel, c, cols, accumulate); break;
    case 4: Tile<4, kStrip>(K, a, lda, panel, c, cols, accumulate); break;
    case 3: Tile<3, kStrip>(K, a, lda, panel, c, cols, accumulate); break;
    case 2: Tile<2, kStrip>(K, a, lda, panel, c, cols, accumulate); break;
    default: Tile<1, kStrip>(K, a, lda, panel, c, cols, accumulate); break;
  }
}

// Row-major C (M, N) = A (M, K; rows lda apart) times B packed by PackPanels.
__attribute__((target("avx2,fma"))) inline void PanelGemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                                          const float* panels, float* C, int64_t ldc) {
  float* rows[kTileRows];
  for (int64_t p = 0; p * kPanel < N; ++p) {
    const float* panel = panels + p * K * kPanel;
    const int64_t cols = std::min<int64_t>(kPanel, N - p * kPanel);
    int64_t m = 0;
    for (; m + kTileRows <= M; m += kTileRows) {
      for (int r = 0; r < kTileRows; ++r) rows[r] = C + (m + r) * ldc + p * kPanel;
      Tile<kTileRows, false>(K, A + m * lda, lda, panel, rows, cols, false);
    }
    if (m < M) {
      for (int64_t r = 0; r < M - m; ++r) rows[r] = C + (m + r) * ldc + p * kPanel;
      TileRows<false>(M - m, K, A + m * lda, lda, panel, rows, cols, false);
    }
  }
}
#else
inline void PanelGemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t) {}
#endif

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

// Scratch memory that stays with the calling thread between calls (no page faults per call).
template <typename T>
T* Scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---- Large products on packed blocks (AVX2 + FMA) ------------------------------------------
//
// The products over all steps of a training call (x W, dx = dZ W^T, and [dW; dU] = [x, H_prev]^T dZ)
// as a blocked GEMM in the manner of GotoBLAS: K in blocks of kBlockK; per block, B's columns packed
// in panels of 16 (kBlockK x 16, 16 KB: stays in L1 while it is used) and op(A)'s rows in strips of 6
// (kBlockK x 6, k-major), and the 6 x 16 register tile (Tile) accumulating into C. op(A) is read
// through an accessor a(m, k), so that A or A^T, or rows gathered from two arrays (H_prev = [h0; ys]),
// are packed without a copy, and C's rows through c_row(m) (the rows of [dW; dU] land in two arrays).
// The operand every thread reads whole is packed once and shared; the threads take groups of the
// other's panels or strips dynamically, one group at a time, so a core that runs slower at the
// moment (on a shared machine, a busy sibling hardware thread) takes fewer groups instead of holding
// the other up at the end, as a static split does. Used on the CPUs that use PanelGemm. On a 2-core
// AVX2 AMD EPYC (Zen) at B = 32, T = 128, F = 128, H = 256, two runs of `python -m
// benchmarks.onednn_gemm` took 0.86-0.97x dnnl_sgemm's time for x W, 0.74x for dx and 0.77-0.82x for
// [x, h]^T dZ.
constexpr int64_t kBlockK = 256;

#if defined(__GNUC__) && defined(__x86_64__)
// Packs unit u (a strip of 6 rows of op(A), or a panel of 16 columns of B) of the K-block at k0
// (kc deep) into out: strips k-major (k, row), panels (k, column); rows or columns past the matrix
// are zero.
template <typename AAt>
inline void PackStrip(const AAt& a, int64_t M, int64_t u, int64_t k0, int64_t kc, float* out) {
  const int64_t r0 = u * kTileRows, live = std::min<int64_t>(kTileRows, M - r0);
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t r = 0; r < kTileRows; ++r) out[k * kTileRows + r] = r < live ? a(r0 + r, k0 + k) : 0.f;
}

__attribute__((target("avx2,fma"))) inline void PackPanel(const float* B, int64_t ldb, int64_t N, int64_t u,
                                                           int64_t k0, int64_t kc, float* out) {
  const int64_t c0 = u * kPanel, cols = std::min<int64_t>(kPanel, N - c0);
  for (int64_t k = 0; k < kc; ++k) {
    const float* src = B + (k0 + k) * ldb + c0;
    float* dst = out + k * kPanel;
    if (cols == kPanel) {
      _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
      _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
    } else {
      for (int64_t l = 0; l < kPanel; ++l) dst[l] = l < cols ? src[l] : 0.f;
    }
  }
}

// C (M, N)'s tile of strip s (rows [6 s, 6 s + 6)) and panel q (columns [16 q, 16 q + 16)), cut at M
// and N, = (or +=) the packed strip (kc x 6) times the packed panel (kc x 16).
template <typename CRow>
__attribute__((target("avx2,fma"))) inline void StripTile(int64_t kc, const float* strip, const float* panel,
                                                           const CRow& c_row, int64_t s, int64_t q, int64_t M,
                                                           int64_t N, bool acc) {
  const int64_t r0 = s * kTileRows, live = std::min<int64_t>(kTileRows, M - r0);
  const int64_t c0 = q * kPanel, cols = std::min<int64_t>(kPanel, N - c0);
  float* rows[kTileRows];
  for (int64_t r = 0; r < live; ++r) rows[r] = c_row(r0 + r) + c0;
  TileRows<true>(live, kc, strip, 0, panel, rows, cols, acc);
}

// C (M, N) = (or +=, accumulate) op(A) (M, K; entry (m, k) = a(m, k)) times B (K, N; rows ldb apart),
// c_row(m) C's row m; on every thread (one inside a parallel region). The operand every thread reads
// whole is packed once, shared: A in strips where M <= N (the threads then take groups of B's
// panels), else B in panels (the threads take groups of A's strips). The groups are dealt out
// dynamically, one at a time, so a core that runs slower at the moment (on a shared machine, a
// busy sibling thread) takes fewer of them instead of holding the others up at the end.
template <typename AAt, typename CRow>
void BlockedGemm(int64_t M, int64_t N, int64_t K, const AAt& a, const float* B, int64_t ldb, const CRow& c_row,
                 bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(c_row(m), c_row(m) + N, 0.f);
    return;
  }
  const bool share_a = M <= N;
  const int64_t strips = (M + kTileRows - 1) / kTileRows, panels = (N + kPanel - 1) / kPanel;
  const int64_t shared_units = share_a ? strips : panels, shared_width = share_a ? kTileRows : kPanel;
  const int64_t own_units = share_a ? panels : strips, own_width = share_a ? kPanel : kTileRows;
  const int64_t group = share_a ? 4 : 16, groups = (own_units + group - 1) / group;
  const int64_t blocks = (K + kBlockK - 1) / kBlockK;
  thread_local std::vector<float> shared_buffer;
  float* shared = Scratch(shared_buffer, K * shared_units * shared_width);
  // Unit u of K-block b (every block but the last is kBlockK deep).
  const auto at = [&](float* base, int64_t units, int64_t width, int64_t b, int64_t u) {
    return base + (b * kBlockK * units + u * std::min(kBlockK, K - b * kBlockK)) * width;
  };
  const int threads = omp_in_parallel() ? 1 : static_cast<int>(std::min<int64_t>(omp_get_max_threads(), groups));
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 8)
    for (int64_t i = 0; i < blocks * shared_units; ++i) {
      const int64_t b = i / shared_units, u = i % shared_units, k0 = b * kBlockK, kc = std::min(kBlockK, K - k0);
      float* out = at(shared, shared_units, shared_width, b, u);
      if (share_a)
        PackStrip(a, M, u, k0, kc, out);
      else
        PackPanel(B, ldb, N, u, k0, kc, out);
    }
    thread_local std::vector<float> own_buffer;
    float* own = Scratch(own_buffer, kBlockK * group * own_width);
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t u0 = g * group, u1 = std::min(own_units, u0 + group);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kBlockK, kc = std::min(kBlockK, K - k0);
        const bool acc = accumulate || b > 0;
        for (int64_t u = u0; u < u1; ++u) {
          float* out = own + (u - u0) * kc * own_width;
          if (share_a)
            PackPanel(B, ldb, N, u, k0, kc, out);
          else
            PackStrip(a, M, u, k0, kc, out);
        }
        if (share_a) {
          for (int64_t q = u0; q < u1; ++q)
            for (int64_t s = 0; s < strips; ++s)
              StripTile(kc, at(shared, strips, kTileRows, b, s), own + (q - u0) * kc * kPanel, c_row, s, q, M, N, acc);
        } else {
          for (int64_t q = 0; q < panels; ++q)
            for (int64_t s = u0; s < u1; ++s)
              StripTile(kc, own + (s - u0) * kc * kTileRows, at(shared, panels, kPanel, b, q), c_row, s, q, M, N, acc);
        }
      }
    }
  }
}
#else
template <typename AAt, typename CRow>
void BlockedGemm(int64_t, int64_t, int64_t, const AAt&, const float*, int64_t, const CRow&, bool) {}
#endif

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

// Whether oneDNN has a bfloat16 GEMM on this CPU: oneDNN 3.2 implements dnnl_gemm_bf16bf16f32 only
// with AVX-512 (AVX512-BF16 or AMX natively, emulated on AVX512-F/BW); on an AVX2-only CPU it
// returns dnnl_unimplemented. Asked once, with a 1 x 1 x 1 product. RECURRENT_NATIVE_WIDEN_BF16=1
// takes the widening path below on any CPU (the tests check it where oneDNN has the GEMM too).
inline bool HasBf16Gemm() {
  static const bool has = [] {
    const char* widen = std::getenv("RECURRENT_NATIVE_WIDEN_BF16");
    if (widen != nullptr && std::string(widen) == "1") return false;
    const bf16 one = 0x3F80;  // 1.0
    float c = 0.f;
    return dnnl_gemm_bf16bf16f32('N', 'N', 1, 1, 1, 1.f, &one, 1, &one, 1, 0.f, &c, 1) == dnnl_success && c == 1.f;
  }();
  return has;
}

// `rows` x `cols` bfloat16 (rows `ld` apart) into float32 `out` (dense): exact.
inline void Bf16ToFloat(const bf16* a, int64_t rows, int64_t cols, int64_t ld, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = FromBf16(a[r * ld + c]);
}

// Row-major C (M, N) = op(A) op(B) + beta C for bfloat16 A and B, float32 C: oneDNN's bfloat16 GEMM
// (float32 accumulation) where the CPU has one; elsewhere the same bfloat16 operands widened to
// float32 (exact) through dnnl_sgemm. The products of bfloat16 values are exact in float32, so both
// compute the same products and accumulate them in float32, in possibly different orders: the
// results agree to float32's rounding, and the bfloat16 path keeps its rounding points on every
// CPU (the widening costs time: a float32 copy of both operands per call).
inline bool GemmBf16(char ta, char tb, int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B_,
                     int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.f ? 0.f : beta * C[m * ldc + n];
    return true;
  }
  if (HasBf16Gemm())
    return dnnl_gemm_bf16bf16f32(ta, tb, M, N, K, 1.f, A, lda, B_, ldb, beta, C, ldc) == dnnl_success;
  const int64_t a_rows = ta == 'N' ? M : K, a_cols = ta == 'N' ? K : M;
  const int64_t b_rows = tb == 'N' ? K : N, b_cols = tb == 'N' ? N : K;
  thread_local std::vector<float> wide;
  float* a = Scratch(wide, a_rows * a_cols + b_rows * b_cols);
  float* b = a + a_rows * a_cols;
  Bf16ToFloat(A, a_rows, a_cols, lda, a);
  Bf16ToFloat(B_, b_rows, b_cols, ldb, b);
  return Gemm(ta, tb, M, N, K, a, a_cols, b, b_cols, beta, C, ldc);
}

RECURRENT_CLONES void ToBf16Rows(int64_t rows, int64_t cols, const float* __restrict src, int64_t src_stride,
                          bf16* __restrict dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) dst[r * dst_stride + k] = ToBf16(src[r * src_stride + k]);
}

}  // namespace
}  // namespace recurrent_native
