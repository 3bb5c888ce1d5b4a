// Stride-1 convolutions of NHWC images with HWIO kernels, and their two gradients, through
// oneDNN: XLA FFI handlers that cnn_jax/onednn.py compiles, loads and registers.
//
// Why: on a CPU XLA runs a convolution's gradients several times slower than oneDNN (the
// library under TensorFlow's), and Model 3's step is mostly convolutions (BENCHMARKS.md).
// The images stay NHWC, XLA's layout, so only the kernels are reordered into the layout that
// oneDNN picks for the shape (small: at most 128 x 128 x 3 x 3 floats).
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using F32x4 = ffi::Buffer<ffi::F32, 4>;
using OutF32x4 = ffi::ResultBuffer<ffi::F32, 4>;
using Args = std::unordered_map<int, memory>;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Images, height, width, input and output channels, kernel height and width, padding.
using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

// Every primitive takes its scratch memory from the caller: the library's own is kept per
// thread, and XLA runs a primitive from threads other than the one that built it.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::reorder::primitive_desc Reorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder::primitive_desc(Engine(), from, Engine(), to, UserScratchpad());
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
  memory scratch;  // for all of them: they run one at a time (Guarded)

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
    auto attr = UserScratchpad();
    fwd_pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, direct, src, any, dst, one, p, p, attr);
    data_pd = dnnl::convolution_backward_data::primitive_desc(Engine(), direct, src, any, dst,
                                                              one, p, p, fwd_pd, attr);
    weights_pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), direct, src, any, dst, one, p, p, fwd_pd, attr);
    fwd = dnnl::convolution_forward(fwd_pd);
    data = dnnl::convolution_backward_data(data_pd);
    weights = dnnl::convolution_backward_weights(weights_pd);
    size_t most = std::max({fwd_pd.scratchpad_desc().get_size(),
                            data_pd.scratchpad_desc().get_size(),
                            weights_pd.scratchpad_desc().get_size()});
    auto reorder = [&](dnnl::reorder& r, const memory::desc& from, const memory::desc& to) {
      if (from == to) return;  // none needed
      auto pd = Reorder(from, to);
      most = std::max(most, pd.scratchpad_desc().get_size());
      r = dnnl::reorder(pd);
    };
    reorder(to_fwd, kernel, fwd_pd.weights_desc());
    reorder(to_data, kernel, data_pd.weights_desc());
    reorder(from_weights, weights_pd.diff_weights_desc(), kernel);
    memory::dims bytes = {static_cast<memory::dim>(std::max<size_t>(most, 1))};
    scratch = memory(memory::desc(bytes, memory::data_type::u8, Tag::x), Engine());
  }

  void Run(dnnl::stream& s, const dnnl::primitive& p, Args args) {
    args.insert({DNNL_ARG_SCRATCHPAD, scratch});
    p.execute(s, args);
  }

  // The kernel in the layout `want`: the caller's buffer itself, or a reordered copy.
  memory KernelAs(dnnl::stream& s, const dnnl::reorder& r, const memory::desc& want,
                  void* data) {
    memory given(kernel, Engine(), data);
    if (!r) return given;
    memory copy(want, Engine());
    Run(s, r, {{DNNL_ARG_FROM, given}, {DNNL_ARG_TO, copy}});
    return copy;
  }
};

// Building the primitives takes milliseconds: once per shape, shared by every call after. Its
// own lock, though every caller holds one_at_a_time: the cache stays safe without it.
Conv& Cached(const Shape& s) {
  static std::mutex mu;
  static std::map<Shape, std::unique_ptr<Conv>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[s];
  if (!slot) slot = std::make_unique<Conv>(s);
  return *slot;
}

// The primitives for NHWC images of shape `image` and an HWIO kernel of shape `kernel`.
template <typename Dims>
Conv& For(const Dims& image, const Dims& kernel, int64_t pad) {
  return Cached({image[0], image[1], image[2], image[3], kernel[3], kernel[0], kernel[1], pad});
}

memory Wrap(const memory::desc& d, void* data) { return memory(d, Engine(), data); }

// One convolution at a time in the process: each spreads over every core itself, and teams of
// OpenMP threads started from several devices' threads at once oversubscribe the cores (and
// hung a run of 8 CPU devices).
std::mutex one_at_a_time;

// A C++ exception must not cross into XLA (it would abort the process): it becomes an error
// that JAX raises in Python.
template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    std::lock_guard<std::mutex> lock(one_at_a_time);
    body();
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("oneDNN convolution: an unknown C++ exception");
  }
}

ffi::Error Forward(F32x4 x, F32x4 kernel, OutF32x4 y, int64_t pad) {
  return Guarded([&] {
    Conv& c = For(x.dimensions(), kernel.dimensions(), pad);
    dnnl::stream s(Engine());
    memory w = c.KernelAs(s, c.to_fwd, c.fwd_pd.weights_desc(), kernel.untyped_data());
    c.Run(s, c.fwd, {{DNNL_ARG_SRC, Wrap(c.src, x.untyped_data())},
                     {DNNL_ARG_WEIGHTS, w},
                     {DNNL_ARG_DST, Wrap(c.dst, y->untyped_data())}});
    s.wait();
  });
}

// The input's gradient: its shape is the result's.
ffi::Error InputGrad(F32x4 dy, F32x4 kernel, OutF32x4 dx, int64_t pad) {
  return Guarded([&] {
    Conv& c = For(dx->dimensions(), kernel.dimensions(), pad);
    dnnl::stream s(Engine());
    memory w = c.KernelAs(s, c.to_data, c.data_pd.weights_desc(), kernel.untyped_data());
    c.Run(s, c.data, {{DNNL_ARG_DIFF_DST, Wrap(c.dst, dy.untyped_data())},
                      {DNNL_ARG_WEIGHTS, w},
                      {DNNL_ARG_DIFF_SRC, Wrap(c.src, dx->untyped_data())}});
    s.wait();
  });
}

ffi::Error KernelGrad(F32x4 x, F32x4 dy, OutF32x4 dk, int64_t pad) {
  return Guarded([&] {
    Conv& c = For(x.dimensions(), dk->dimensions(), pad);
    dnnl::stream s(Engine());
    memory hwio = Wrap(c.kernel, dk->untyped_data());
    memory out = c.from_weights ? memory(c.weights_pd.diff_weights_desc(), Engine()) : hwio;
    c.Run(s, c.weights, {{DNNL_ARG_SRC, Wrap(c.src, x.untyped_data())},
                         {DNNL_ARG_DIFF_DST, Wrap(c.dst, dy.untyped_data())},
                         {DNNL_ARG_DIFF_WEIGHTS, out}});
    if (c.from_weights) c.Run(s, c.from_weights, {{DNNL_ARG_FROM, out}, {DNNL_ARG_TO, hwio}});
    s.wait();
  });
}

// The three handlers take the same: two rank-4 float32 arrays, one result, the padding.
auto Binding() {
  return ffi::Ffi::Bind().Arg<F32x4>().Arg<F32x4>().Ret<F32x4>().Attr<int64_t>("pad");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvInputGrad, InputGrad, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnConvKernelGrad, KernelGrad, Binding());
