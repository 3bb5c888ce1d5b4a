// Stride-1 convolutions of NHWC images with HWIO kernels, and their two gradients, through
// oneDNN: XLA FFI handlers that cnn_jax/onednn.py compiles, loads and registers.
//
// Why: on a CPU XLA runs a convolution's gradients several times slower than oneDNN (the
// library under TensorFlow's), and Model 3's step is mostly convolutions (BENCHMARKS.md).
// The images stay NHWC, XLA's layout, so only the kernels are reordered into the layout that
// oneDNN picks for the shape (small: at most 128 x 128 x 3 x 3 floats).
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using F32x4 = ffi::Buffer<ffi::F32, 4>;
using OutF32x4 = ffi::ResultBuffer<ffi::F32, 4>;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Images, height, width, input and output channels, kernel height and width, padding.
using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

dnnl::reorder Reorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

// The three primitives of one shape, and the kernel reorders each needs (none where oneDNN
// takes the HWIO layout as it is).
struct Conv {
  memory::desc src, dst, kernel;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc data_pd;
  dnnl::convolution_backward_weights::primitive_desc weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data data;
  dnnl::convolution_backward_weights weights;
  dnnl::reorder to_fwd, to_data, from_weights;

  explicit Conv(const Shape& s) {
    auto [n, h, w, ci, co, kh, kw, pad] = s;
    auto f32 = memory::data_type::f32;
    memory::dims out = {n, co, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1};
    src = memory::desc({n, ci, h, w}, f32, Tag::nhwc);
    dst = memory::desc(out, f32, Tag::nhwc);
    kernel = memory::desc({co, ci, kh, kw}, f32, Tag::hwio);
    memory::desc any({co, ci, kh, kw}, f32, Tag::any);
    memory::dims one = {1, 1}, p = {pad, pad};
    auto direct = dnnl::algorithm::convolution_direct;
    fwd_pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, direct, src, any, dst, one, p, p);
    data_pd = dnnl::convolution_backward_data::primitive_desc(Engine(), direct, src, any, dst,
                                                              one, p, p, fwd_pd);
    weights_pd = dnnl::convolution_backward_weights::primitive_desc(Engine(), direct, src, any,
                                                                    dst, one, p, p, fwd_pd);
    fwd = dnnl::convolution_forward(fwd_pd);
    data = dnnl::convolution_backward_data(data_pd);
    weights = dnnl::convolution_backward_weights(weights_pd);
    if (fwd_pd.weights_desc() != kernel) to_fwd = Reorder(kernel, fwd_pd.weights_desc());
    if (data_pd.weights_desc() != kernel) to_data = Reorder(kernel, data_pd.weights_desc());
    if (weights_pd.diff_weights_desc() != kernel)
      from_weights = Reorder(weights_pd.diff_weights_desc(), kernel);
  }
};

// Building the primitives takes milliseconds: once per shape, shared by every call after.
Conv& Cached(const Shape& s) {
  static std::mutex mu;
  static std::map<Shape, std::unique_ptr<Conv>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[s];
  if (!slot) slot = std::make_unique<Conv>(s);
  return *slot;
}

memory Wrap(const memory::desc& d, void* data) { return memory(d, Engine(), data); }

// The kernel in the layout `want`: the caller's buffer itself, or a reordered copy.
memory KernelAs(dnnl::stream& s, const dnnl::reorder& r, const memory::desc& want,
                const memory::desc& hwio, void* data) {
  memory given = Wrap(hwio, data);
  if (!r) return given;
  memory copy(want, Engine());
  r.execute(s, given, copy);
  return copy;
}

// A C++ exception must not cross into XLA (it would abort the process): it becomes an error
// that JAX raises in Python.
//
// One convolution at a time in the process: each spreads over every core itself, and teams of
// OpenMP threads started from several devices' threads at once oversubscribe the cores (and
// hung a run of 8 CPU devices).
template <typename Body>
ffi::Error Guarded(Body body) {
  static std::mutex one_at_a_time;
  try {
    std::lock_guard<std::mutex> lock(one_at_a_time);
    body();
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
}

ffi::Error Forward(F32x4 x, F32x4 kernel, OutF32x4 y, int64_t pad) {
  return Guarded([&] {
    auto d = x.dimensions();
    auto k = kernel.dimensions();
    Conv& c = Cached({d[0], d[1], d[2], d[3], k[3], k[0], k[1], pad});
    dnnl::stream s(Engine());
    memory w = KernelAs(s, c.to_fwd, c.fwd_pd.weights_desc(), c.kernel, kernel.untyped_data());
    c.fwd.execute(s, {{DNNL_ARG_SRC, Wrap(c.src, x.untyped_data())},
                      {DNNL_ARG_WEIGHTS, w},
                      {DNNL_ARG_DST, Wrap(c.dst, y->untyped_data())}});
    s.wait();
  });
}

// The input's gradient: its shape is the result's.
ffi::Error InputGrad(F32x4 dy, F32x4 kernel, OutF32x4 dx, int64_t pad) {
  return Guarded([&] {
    auto d = dx->dimensions();
    auto k = kernel.dimensions();
    Conv& c = Cached({d[0], d[1], d[2], d[3], k[3], k[0], k[1], pad});
    dnnl::stream s(Engine());
    memory w = KernelAs(s, c.to_data, c.data_pd.weights_desc(), c.kernel, kernel.untyped_data());
    c.data.execute(s, {{DNNL_ARG_DIFF_DST, Wrap(c.dst, dy.untyped_data())},
                       {DNNL_ARG_WEIGHTS, w},
                       {DNNL_ARG_DIFF_SRC, Wrap(c.src, dx->untyped_data())}});
    s.wait();
  });
}

ffi::Error KernelGrad(F32x4 x, F32x4 dy, OutF32x4 dk, int64_t pad) {
  return Guarded([&] {
    auto k = dk->dimensions();
    auto d = x.dimensions();
    Conv& c = Cached({d[0], d[1], d[2], d[3], k[3], k[0], k[1], pad});
    dnnl::stream s(Engine());
    memory hwio = Wrap(c.kernel, dk->untyped_data());
    memory out = c.from_weights ? memory(c.weights_pd.diff_weights_desc(), Engine()) : hwio;
    c.weights.execute(s, {{DNNL_ARG_SRC, Wrap(c.src, x.untyped_data())},
                          {DNNL_ARG_DIFF_DST, Wrap(c.dst, dy.untyped_data())},
                          {DNNL_ARG_DIFF_WEIGHTS, out}});
    if (c.from_weights) c.from_weights.execute(s, out, hwio);
    s.wait();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32x4>()
                                  .Arg<F32x4>()
                                  .Ret<F32x4>()
                                  .Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvInputGrad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Arg<F32x4>()
                                  .Arg<F32x4>()
                                  .Ret<F32x4>()
                                  .Attr<int64_t>("pad"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<F32x4>()
                                  .Arg<F32x4>()
                                  .Ret<F32x4>()
                                  .Attr<int64_t>("pad"));
