// Generic machinery of purecomp's elementwise CPU kernels with per-channel parameters (fake
// quantization, activation binarization): element IO for float32/float16/bfloat16, double lane
// sums, the (outer, channels, inner) layout of dense tensors of any stride order, and the
// parallel forward / backward drivers. The drivers call an Op, the per-position parameters of one
// kernel, which provides:
//
//   using Table;                                         per-position parameter table
//   static Op splat(const Table&, int64_t channel);      one value per channel (splat mode)
//   static Op lanes(const Table&, int64_t position);     one value per lane (lane mode)
//   Vec forward(const Vec& x) const;                     the forward value
//   void terms(x, g, dx, t0, t1, t2) const;              grad_x and three per-element sum terms
//   void accumulate(x, g, dx, a0, a1, a2) const;         the same, with a_k += t_k
//
// The backward returns per-channel Sums {s0, s1, s2} of the three terms, summed in fixed chunks
// (no atomics; the result does not depend on the thread count). Compile with
// -ffp-contract=off so that no a*b+c is fused into an FMA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace purecomp {
namespace cpu {

using at::vec::Vectorized;
using Vec = Vectorized<float>;

constexpr int64_t kVS = Vec::size();
constexpr int64_t kForwardGrain = 16384;     // elements per forward task at least
constexpr int64_t kChunkElems = 65536;       // elements per backward chunk at least
constexpr int64_t kMaxChunks = 64;           // backward chunks (fixed: results do not depend on threads)
constexpr int64_t kLanesBelow = 32;          // inner extent under which params vary per lane
constexpr int64_t kColumnBlock = 4096;       // columns per backward chunk in per-lane mode
constexpr int64_t kFlushUnits = 64;          // float accumulation length before a flush to double
constexpr int64_t kPad = 2 * kVS + 1;        // padding of per-lane tables (full vector loads)
constexpr int64_t kStreamBytes = int64_t{4} << 20;  // float32 outputs this large bypass the caches

// ---------------------------------------------------------------- element IO
// One "unit" is Vectorized<T>::size() elements held as kVecs float vectors.
template <typename T>
struct Io {
  static constexpr int kVecs = 2;
  static constexpr int64_t kUnit = Vectorized<T>::size();
  static void load(const T* p, int64_t n, Vec* v) {
    const auto raw = n >= kUnit ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(raw);
  }
  static void store(T* p, int64_t n, const Vec* v) {
    const auto raw = at::vec::convert_from_float<T>(v[0], v[1]);
    if (n >= kUnit) raw.store(p); else raw.store(p, n);
  }
};

template <>
struct Io<float> {
  static constexpr int kVecs = 1;
  static constexpr int64_t kUnit = kVS;
  static void load(const float* p, int64_t n, Vec* v) { v[0] = n >= kUnit ? Vec::loadu(p) : Vec::loadu(p, n); }
  static void store(float* p, int64_t n, const Vec* v) {
    if (n >= kUnit) v[0].store(p); else v[0].store(p, n);
  }
};

static_assert(Io<at::Half>::kUnit == 2 * kVS && Io<at::BFloat16>::kUnit == 2 * kVS,
              "a reduced-precision vector must hold two float vectors");

// Double accumulators, one per vector lane: a float vector is added lane-wise (no scalar
// dependency chain), and the lanes are summed pairwise at the end.
#if defined(CPU_CAPABILITY_AVX512)
struct LaneSum {
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  void add(const Vec& v) {
    const __m512 f = v;
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
  }
  double total() const { return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }
};
#else
struct LaneSum {
  alignas(64) double lane[kVS] = {};
  void add(const Vec& v) {
    alignas(64) float f[kVS];
    v.store(f);
    for (int64_t l = 0; l < kVS; ++l) lane[l] += f[l];
  }
  double total() {
    for (int64_t w = kVS / 2; w > 0; w /= 2) {
      for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
    }
    return lane[0];
  }
};
#endif

// Per-channel sums of the three backward terms (what they are is the Op's business).
struct Sums {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
};

// ---------------------------------------------------------------- segments
// A segment is a contiguous run of elements in one row. In splat mode p is the channel;
// in lane mode p is the position of the first element inside the (channels x inner) row.

// Non-temporal stores of float32 vectors (to vector-aligned addresses): an output much larger
// than the caches goes straight to memory instead of being read in first (read for ownership).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kCanStream = true;
inline void stream_store(float* p, const Vec& v) { _mm512_stream_ps(p, v); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
inline void stream_store(float* p, const Vec& v) { _mm256_stream_ps(p, v); }
#else
constexpr bool kCanStream = false;
inline void stream_store(float* p, const Vec& v) { v.store(p); }
#endif
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename T, typename Op, bool kLanes, bool kStream = false>
void forward_segment(const T* x, T* out, int64_t n, const typename Op::Table& table, int64_t p) {
  constexpr int kV = Io<T>::kVecs;
  constexpr int64_t kU = Io<T>::kUnit;
  int64_t i = 0;
  if constexpr (kStream) {
    static_assert(std::is_same_v<T, float>, "streaming stores are float32 only");
    // ordinary stores up to the first vector-aligned output address
    constexpr uintptr_t kAlign = sizeof(Vec);
    const int64_t head = std::min<int64_t>(n, ((kAlign - reinterpret_cast<uintptr_t>(out) % kAlign) % kAlign) / 4);
    forward_segment<T, Op, kLanes>(x, out, head, table, p);
    i = head;
  }
  Op op[kV];
  if constexpr (!kLanes) {
    for (int k = 0; k < kV; ++k) op[k] = Op::splat(table, p);
  }
  Vec xv[kV], ov[kV];
  for (; i < n; i += kU) {
    const int64_t cnt = std::min(kU, n - i);
    if constexpr (kLanes) {
      for (int k = 0; k < kV; ++k) op[k] = Op::lanes(table, p + i + k * kVS);
    }
    Io<T>::load(x + i, cnt, xv);
    for (int k = 0; k < kV; ++k) ov[k] = op[k].forward(xv[k]);
    if constexpr (kStream) {
      if (cnt == kU) {
        stream_store(out + i, ov[0]);
        continue;
      }
    }
    Io<T>::store(out + i, cnt, ov);
  }
}

template <typename T, typename Op>
void backward_segment_splat(const T* g, const T* x, T* dx, int64_t n, const Op& op, Sums& sums) {
  constexpr int kV = Io<T>::kVecs;
  constexpr int64_t kU = Io<T>::kUnit;
  Vec a0(0.f), a1(0.f), a2(0.f);
  LaneSum d0, d1, d2;
  Vec xv[kV], gv[kV], dv[kV];
  int64_t units = 0;
  auto flush = [&] {
    d0.add(a0);
    d1.add(a1);
    d2.add(a2);
    a0 = a1 = a2 = Vec(0.f);
  };
  for (int64_t i = 0; i < n; i += kU) {
    const int64_t cnt = std::min(kU, n - i);
    Io<T>::load(x + i, cnt, xv);
    Io<T>::load(g + i, cnt, gv);  // lanes past cnt load as 0 and contribute 0
    for (int k = 0; k < kV; ++k) op.accumulate(xv[k], gv[k], dv[k], a0, a1, a2);
    Io<T>::store(dx + i, cnt, dv);
    if (++units == kFlushUnits) {
      flush();
      units = 0;
    }
  }
  flush();
  sums.s0 += d0.total();
  sums.s1 += d1.total();
  sums.s2 += d2.total();
}

inline void accumulate(float* acc, int64_t cnt, const Vec& v) {
  if (cnt >= kVS) {
    (Vec::loadu(acc) + v).store(acc);
  } else {
    (Vec::loadu(acc, cnt) + v).store(acc, cnt);
  }
}

template <typename T, typename Op>
void backward_segment_lanes(const T* g, const T* x, T* dx, int64_t n, const typename Op::Table& table, int64_t p,
                            float* acc0, float* acc1, float* acc2) {
  constexpr int kV = Io<T>::kVecs;
  constexpr int64_t kU = Io<T>::kUnit;
  Vec xv[kV], gv[kV], dv[kV], t0, t1, t2;
  for (int64_t i = 0; i < n; i += kU) {
    const int64_t cnt = std::min(kU, n - i);
    Io<T>::load(x + i, cnt, xv);
    Io<T>::load(g + i, cnt, gv);
    for (int k = 0; k < kV; ++k) {
      const int64_t off = p + i + k * kVS;
      const int64_t lanes = std::min<int64_t>(kVS, cnt - k * kVS);
      Op::lanes(table, off).terms(xv[k], gv[k], dv[k], t0, t1, t2);
      if (lanes > 0) {
        accumulate(acc0 + off, lanes, t0);
        accumulate(acc1 + off, lanes, t1);
        accumulate(acc2 + off, lanes, t2);
      }
    }
    Io<T>::store(dx + i, cnt, dv);
  }
}

// ---------------------------------------------------------------- drivers

// x viewed as a contiguous (outer, channels, inner) block; per-tensor is (1, 1, numel).
struct Geometry {
  int64_t outer = 1, channels = 1, inner = 1;
  int64_t numel() const { return outer * channels * inner; }
  bool lanes() const { return inner < kLanesBelow; }
  int64_t row() const { return lanes() ? channels * inner : inner; }
};

template <typename T, typename Op>
void run_forward(const T* x, T* out, const Geometry& geo, const typename Op::Table& table) {
  const int64_t row_len = geo.row();
  const bool lanes = geo.lanes();
  bool stream = false;
  if constexpr (std::is_same_v<T, float>) {
    stream = kCanStream && geo.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  }
  const auto body = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / row_len;
      const int64_t stop = std::min(end, (row + 1) * row_len);
      const int64_t p = lanes ? i - row * row_len : row % geo.channels;
      if constexpr (std::is_same_v<T, float>) {
        if (stream) {
          if (lanes) forward_segment<T, Op, true, true>(x + i, out + i, stop - i, table, p);
          else forward_segment<T, Op, false, true>(x + i, out + i, stop - i, table, p);
          i = stop;
          continue;
        }
      }
      if (lanes) forward_segment<T, Op, true>(x + i, out + i, stop - i, table, p);
      else forward_segment<T, Op, false>(x + i, out + i, stop - i, table, p);
      i = stop;
    }
    if (stream) stream_fence();  // order the streamed stores before the results are used
  };
  // at::parallel_for wakes the whole pool even when one task gets all the work
  if (geo.numel() < 2 * kForwardGrain) {
    body(0, geo.numel());
  } else {
    at::parallel_for(0, geo.numel(), kForwardGrain, body);
  }
}

// Runs tasks [0, tasks) of a backward over `elems` elements: on this thread alone when there is
// one task or little work (waking the pool costs more than it saves), else with at::parallel_for.
// The tasks, and so the results, are the same either way.
template <typename F>
void parallel_tasks(int64_t tasks, int64_t elems, const F& body) {
  if (tasks == 1 || elems < kChunkElems) {
    body(0, tasks);
  } else {
    at::parallel_for(0, tasks, 1, body);
  }
}

// Returns per-channel Sums. Splat mode: contiguous chunks of the flat range, partials per
// (chunk, channel) in double. Lane mode: (row group x column block) chunks, partials per
// (row group, position) in float, reduced in double at the end.
template <typename T, typename Op>
std::vector<Sums> run_backward(const T* g, const T* x, T* dx, const Geometry& geo, const typename Op::Table& table) {
  const int64_t N = geo.numel();
  const int64_t C = geo.channels;
  std::vector<Sums> result(C);
  if (N == 0) return result;
  if (!geo.lanes()) {
    int64_t chunks = std::clamp<int64_t>((N + kChunkElems - 1) / kChunkElems, 1, kMaxChunks);
    chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, (int64_t{1} << 20) / C));
    std::vector<Sums> partial(chunks * C);
    parallel_tasks(chunks, N, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t end = N * (chunk + 1) / chunks;
        Sums* mine = partial.data() + chunk * C;
        for (int64_t i = N * chunk / chunks; i < end;) {
          const int64_t row = i / geo.inner;
          const int64_t stop = std::min(end, (row + 1) * geo.inner);
          const int64_t c = row % C;
          backward_segment_splat<T, Op>(g + i, x + i, dx + i, stop - i, Op::splat(table, c), mine[c]);
          i = stop;
        }
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t c = 0; c < C; ++c) {
        const Sums& s = partial[chunk * C + c];
        result[c].s0 += s.s0;
        result[c].s1 += s.s1;
        result[c].s2 += s.s2;
      }
    }
    return result;
  }
  const int64_t L = geo.row();
  const int64_t blocks = (L + kColumnBlock - 1) / kColumnBlock;
  int64_t groups = std::clamp<int64_t>(kMaxChunks / blocks, 1, geo.outer);
  groups = std::max<int64_t>(1, std::min<int64_t>(groups, (int64_t{1} << 24) / (3 * L)));
  std::vector<float> acc(groups * 3 * L, 0.f);
  parallel_tasks(groups * blocks, N, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t group = chunk / blocks, block = chunk % blocks;
      const int64_t c0 = block * kColumnBlock, c1 = std::min(L, c0 + kColumnBlock);
      float* base = acc.data() + group * 3 * L;
      const int64_t r1 = geo.outer * (group + 1) / groups;
      for (int64_t r = geo.outer * group / groups; r < r1; ++r) {
        const int64_t o = r * L + c0;
        backward_segment_lanes<T, Op>(g + o, x + o, dx + o, c1 - c0, table, c0, base, base + L, base + 2 * L);
      }
    }
  });
  for (int64_t group = 0; group < groups; ++group) {
    const float* base = acc.data() + group * 3 * L;
    for (int64_t c = 0, j = 0; c < C; ++c) {
      Sums& s = result[c];
      for (int64_t e = 0; e < geo.inner; ++e, ++j) {
        s.s0 += base[j];
        s.s1 += base[L + j];
        s.s2 += base[2 * L + j];
      }
    }
  }
  return result;
}

// ---------------------------------------------------------------- layout and checks

// The elements of x in memory order as a (outer, channels, inner) block. Dense tensors of
// any stride order (channels_last included) are used in place; others are copied first.
// Only strides are inspected: no tensor op runs on the common (dense) path.
struct Dense {
  at::Tensor x;  // dense input (x itself or a dense copy)
  Geometry geo;
};

inline Dense make_dense(const at::Tensor& input, std::optional<int64_t> axis) {
  Dense d;
  // Non-dense inputs are copied in the layout at::empty_like gives them, so that the output
  // (allocated with d.x's strides, which are those of at::empty_like(input)) and d.x share strides.
  d.x = input.is_non_overlapping_and_dense() ? input : input.contiguous(input.suggest_memory_format());
  if (!axis.has_value()) {
    d.geo.inner = d.x.numel();
    return d;
  }
  const int64_t dim = d.x.dim();
  const auto sizes = d.x.sizes();
  const auto strides = d.x.strides();
  c10::SmallVector<int64_t, 8> perm(dim);  // dims of x in memory order (outermost first)
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });
  int64_t expected = 1;  // a dense tensor is contiguous in stride order
  for (int64_t i = dim - 1; i >= 0; --i) {
    const int64_t size = sizes[perm[i]];
    TORCH_INTERNAL_ASSERT(size == 1 || strides[perm[i]] == expected,
                          "purecomp: a dense tensor is contiguous in stride order");
    expected *= size;
  }
  const int64_t pos = std::find(perm.begin(), perm.end(), *axis) - perm.begin();
  for (int64_t i = 0; i < dim; ++i) {
    const int64_t size = sizes[perm[i]];
    if (i < pos) d.geo.outer *= size;
    else if (i == pos) d.geo.channels = size;
    else d.geo.inner *= size;
  }
  return d;
}

// An uninitialized tensor with d.x's sizes and strides (those of at::empty_like(input)), allocated
// directly (no dispatcher round trip: this runs inside the CPU kernel).
inline at::Tensor empty_like_dense(const Dense& d) {
  return at::Tensor(at::detail::empty_strided_cpu(d.x.sizes(), d.x.strides(), d.x.scalar_type()));
}

// grad with the memory order of d.x (itself when the strides agree, else a copy in d.x's layout).
inline at::Tensor grad_like_dense(const at::Tensor& grad, const Dense& d) {
  if (grad.strides() == d.x.strides()) return grad;
  at::Tensor g = empty_like_dense(d);
  g.copy_(grad);
  return g;
}
template <typename F>
void dispatch_floating(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "purecomp: unsupported dtype ", t);
  }
}

// Per-position table of per-channel values: itself in splat mode, each channel repeated
// `inner` times in lane mode; padded with `fill` for full vector loads.
inline std::vector<float> layout_table(std::vector<float> per_channel, const Geometry& geo, float fill) {
  if (!geo.lanes()) return per_channel;
  std::vector<float> out(geo.channels * geo.inner + kPad, fill);
  for (int64_t c = 0, j = 0; c < geo.channels; ++c) {
    for (int64_t e = 0; e < geo.inner; ++e, ++j) out[j] = per_channel[c];
  }
  return out;
}

// Output buffer of grad_x, laid out as d.x. The kernel reads each element of g before writing
// the same element of grad_x, so g's buffer serves when it is ours: a private copy of grad, or grad
// itself when the caller gave it up (`reuse_grad`).
inline at::Tensor grad_x_buffer(const at::Tensor& grad, const at::Tensor& g, const Dense& d, bool reuse_grad) {
  if (reuse_grad || !g.is_same(grad)) return g;
  return empty_like_dense(d);
}

}  // namespace cpu
}  // namespace purecomp
