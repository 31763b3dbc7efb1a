// One plain LSTM layer as one XLA FFI custom call into oneDNN's LSTM primitive (forward
// training and backward), the library PyTorch's CPU LSTM uses.
//
// Layouts (float32, one layer, one direction, time-major):
//   x (T, B, F), W (F, 4H), U (H, 4H), b (4H,), h0, c0 (B, H); gates i, f, g, o.
// Ours are oneDNN's user layouts as they are: x is `tnc` (oneDNN picks its fast brgemm
// implementation for `tnc`, its reference one for batch-first `ntc`), W and U are `ldigo` with L = D = 1
// (i over inputs, g over the four gates, o over H), b is `ldgo`, and oneDNN's gate order
// (i, f, c~, o) is ours, so no gate reorder is needed. The primitive picks its own weight
// layouts (`any`); the weights are reordered into them on every call (they change every step
// of training), and the gradients back.
//
// The forward keeps oneDNN's workspace (its saved gates) as an output, so the backward call
// reads it instead of recomputing the forward.

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>

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

// One lock around the primitive caches and every execution: XLA may run custom calls from
// several threads, and the primitives share one stream.
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

dnnl::lstm_forward::primitive_desc ForwardPd(const Shape& s, bool training) {
  Descs d = UserDescs(s);
  return dnnl::lstm_forward::primitive_desc(
      Engine(), training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference, dnnl::rnn_direction::unidirectional_left2right, d.x, d.h, d.h,
      Any(d.W), Any(d.U), d.b, d.y, d.h, d.h);
}

struct Forward {
  dnnl::lstm_forward::primitive_desc pd;
  dnnl::lstm_forward prim;
};

struct Backward {
  dnnl::lstm_backward::primitive_desc pd;
  dnnl::lstm_backward prim;
};

// The forward primitive for one shape; `training` keeps the workspace the backward reads.
Forward& ForwardFor(const Shape& s, bool training = true) {
  static std::map<std::pair<Shape, bool>, std::unique_ptr<Forward>> cache;
  auto& slot = cache[{s, training}];
  if (!slot) {
    auto pd = ForwardPd(s, training);
    slot.reset(new Forward{pd, dnnl::lstm_forward(pd)});
  }
  return *slot;
}

Backward& BackwardFor(const Shape& s) {
  static std::map<Shape, std::unique_ptr<Backward>> cache;
  auto& slot = cache[s];
  if (!slot) {
    Descs d = UserDescs(s);
    auto pd = dnnl::lstm_backward::primitive_desc(
        Engine(), dnnl::prop_kind::backward, dnnl::rnn_direction::unidirectional_left2right, d.x, d.h, d.h,
        Any(d.W), Any(d.U), d.b, d.y, d.h, d.h, d.x, d.h, d.h, Any(d.W), Any(d.U), d.b, d.y, d.h, d.h,
        ForwardFor(s).pd);
    slot.reset(new Backward{pd, dnnl::lstm_backward(pd)});
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

// Zeroed memory in the primitive's layout `want` for the output `user`: `user` itself if they agree.
memory Scratch(const memory& user, const memory::desc& want) {
  memory out = user.get_desc() == want ? user : memory(want, Engine());
  std::memset(out.get_data_handle(), 0, want.get_size());
  return out;
}

ffi::Error Fail(const std::string& what) { return ffi::Error(ffi::ErrorCode::kInternal, "recurrent native LSTM: " + what); }

Shape ShapeOf(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& U) {
  auto xd = x.dimensions();
  return {xd[1], xd[0], xd[2], U.dimensions()[0]};  // x is (T, B, F)
}

// `workspace` is null for inference (no backward follows).
ffi::Error Run(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& W, ffi::Buffer<ffi::F32>& U, ffi::Buffer<ffi::F32>& b,
               ffi::Buffer<ffi::F32>& h0, ffi::Buffer<ffi::F32>& c0, ffi::ResultBuffer<ffi::F32>& ys,
               ffi::ResultBuffer<ffi::F32>& hT, ffi::ResultBuffer<ffi::F32>& cT, ffi::ResultBuffer<ffi::U8>* workspace) {
  try {
    Shape s = ShapeOf(x, U);
    std::lock_guard<std::mutex> guard(Lock());
    Forward& f = ForwardFor(s, workspace != nullptr);
    if (workspace && (*workspace)->size_bytes() != f.pd.workspace_desc().get_size())
      return Fail("workspace size mismatch");
    Descs d = UserDescs(s);
    memory Wp = Into(Wrap(d.W, W.typed_data()), f.pd.weights_layer_desc());
    memory Up = Into(Wrap(d.U, U.typed_data()), f.pd.weights_iter_desc());
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC_LAYER, Wrap(d.x, x.typed_data())},
                              {DNNL_ARG_SRC_ITER, Wrap(d.h, h0.typed_data())},
                              {DNNL_ARG_SRC_ITER_C, Wrap(d.h, c0.typed_data())},
                              {DNNL_ARG_WEIGHTS_LAYER, Wp},
                              {DNNL_ARG_WEIGHTS_ITER, Up},
                              {DNNL_ARG_BIAS, Wrap(d.b, b.typed_data())},
                              {DNNL_ARG_DST_LAYER, Wrap(d.y, ys->typed_data())},
                              {DNNL_ARG_DST_ITER, Wrap(d.h, hT->typed_data())},
                              {DNNL_ARG_DST_ITER_C, Wrap(d.h, cT->typed_data())}};
    if (workspace) args[DNNL_ARG_WORKSPACE] = Wrap(f.pd.workspace_desc(), (*workspace)->untyped_data());
    f.prim.execute(Stream(), args);
    Stream().wait();
  } catch (const dnnl::error& e) {
    return Fail(e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                       ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT, ffi::ResultBuffer<ffi::F32> cT,
                       ffi::ResultBuffer<ffi::U8> workspace) {
  return Run(x, W, U, b, h0, c0, ys, hT, cT, &workspace);
}

ffi::Error InferenceImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                         ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                         ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT,
                         ffi::ResultBuffer<ffi::F32> cT) {
  return Run(x, W, U, b, h0, c0, ys, hT, cT, nullptr);
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> U,
                        ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> ys, ffi::Buffer<ffi::F32> hT, ffi::Buffer<ffi::F32> cT,
                        ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dhT,
                        ffi::Buffer<ffi::F32> dcT, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dW,
                        ffi::ResultBuffer<ffi::F32> dU, ffi::ResultBuffer<ffi::F32> db,
                        ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0) {
  try {
    Shape s = ShapeOf(x, U);
    std::lock_guard<std::mutex> guard(Lock());
    Backward& bw = BackwardFor(s);
    Descs d = UserDescs(s);
    memory Wp = Into(Wrap(d.W, W.typed_data()), bw.pd.weights_layer_desc());
    memory Up = Into(Wrap(d.U, U.typed_data()), bw.pd.weights_iter_desc());
    // The weight gradients go straight into the outputs where oneDNN's layout is ours, else
    // through a buffer reordered after. oneDNN accumulates into them: start them at zero.
    memory dWu = Wrap(d.W, dW->typed_data());
    memory dUu = Wrap(d.U, dU->typed_data());
    memory dWp = Scratch(dWu, bw.pd.diff_weights_layer_desc());
    memory dUp = Scratch(dUu, bw.pd.diff_weights_iter_desc());
    std::memset(db->untyped_data(), 0, db->size_bytes());
    memory dbm = Wrap(d.b, db->typed_data());
    bw.prim.execute(Stream(), {{DNNL_ARG_SRC_LAYER, Wrap(d.x, x.typed_data())},
                               {DNNL_ARG_SRC_ITER, Wrap(d.h, h0.typed_data())},
                               {DNNL_ARG_SRC_ITER_C, Wrap(d.h, c0.typed_data())},
                               {DNNL_ARG_WEIGHTS_LAYER, Wp},
                               {DNNL_ARG_WEIGHTS_ITER, Up},
                               {DNNL_ARG_BIAS, Wrap(d.b, b.typed_data())},
                               {DNNL_ARG_DST_LAYER, Wrap(d.y, ys.typed_data())},
                               {DNNL_ARG_DST_ITER, Wrap(d.h, hT.typed_data())},
                               {DNNL_ARG_DST_ITER_C, Wrap(d.h, cT.typed_data())},
                               {DNNL_ARG_WORKSPACE, Wrap(bw.pd.workspace_desc(), workspace.untyped_data())},
                               {DNNL_ARG_DIFF_DST_LAYER, Wrap(d.y, dys.typed_data())},
                               {DNNL_ARG_DIFF_DST_ITER, Wrap(d.h, dhT.typed_data())},
                               {DNNL_ARG_DIFF_DST_ITER_C, Wrap(d.h, dcT.typed_data())},
                               {DNNL_ARG_DIFF_SRC_LAYER, Wrap(d.x, dx->typed_data())},
                               {DNNL_ARG_DIFF_SRC_ITER, Wrap(d.h, dh0->typed_data())},
                               {DNNL_ARG_DIFF_SRC_ITER_C, Wrap(d.h, dc0->typed_data())},
                               {DNNL_ARG_DIFF_WEIGHTS_LAYER, dWp},
                               {DNNL_ARG_DIFF_WEIGHTS_ITER, dUp},
                               {DNNL_ARG_DIFF_BIAS, dbm}});
    if (dWp.get_data_handle() != dWu.get_data_handle()) dnnl::reorder(dWp, dWu).execute(Stream(), dWp, dWu);
    if (dUp.get_data_handle() != dUu.get_data_handle()) dnnl::reorder(dUp, dUu).execute(Stream(), dUp, dUu);
    Stream().wait();
  } catch (const dnnl::error& e) {
    return Fail(e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// The workspace's size in bytes for one shape (the Python wrapper sizes the forward's
// workspace output with it at trace time); -1 if oneDNN cannot build the primitive.
extern "C" int64_t recurrent_lstm_workspace_bytes(int64_t B, int64_t T, int64_t F, int64_t H) {
  try {
    std::lock_guard<std::mutex> guard(Lock());
    return static_cast<int64_t>(ForwardFor({B, T, F, H}).pd.workspace_desc().get_size());
  } catch (const dnnl::error&) {
    return -1;
  }
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
