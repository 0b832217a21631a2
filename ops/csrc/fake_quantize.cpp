// Fake quantization CPU kernels: symmetric and asymmetric, per-tensor and per-channel.
//
// The canonical definitions are the pure-torch composites of ops/reference.py; these
// kernels reproduce them bit for bit in the forward (float32: same divisions, same
// round-half-to-even, same order of float operations) and to float tolerance in the
// backward. Compile with -ffp-contract=off so that no a*b+c is fused into an FMA.
//
// Symmetric (levels ql..qh): s = |scale| + 1e-16, step = s / qh, r = nearbyint(x / step),
//   inside: ql <= r <= qh, above: r > qh, below: otherwise (r < ql, or NaN);
//   out = clamp(r, ql, qh) * step (+0, which turns -0 into +0 as the reference's
//   out + (surrogate - surrogate) does).
//   dx = g inside, 0 outside; dscale = sgn(scale) * sum(g*(out-x)/s inside, g above, g*ql/qh below).
// Asymmetric (levels 0..n): low and range adjusted so that zero is a level (as in
//   reference.adjust_asymmetric_range), step = range / n, zp = nearbyint(-low / step),
//   r = nearbyint((x - low) / step), out = (clamp(r, 0, n) - zp) * step (+0).
//   dx = g inside; dlow = sum(g outside); drange = sgn(range) * sum(g*(out-x)/range inside, g above).
//
// Forward: one pass over x writing out. Backward: one pass over (grad, x) writing grad_x and
// summing the parameter gradients in per-chunk partials (no atomics), the regions being
// recomputed from x exactly as in the forward (so no region mask is stored).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "fake_quantize.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace purecomp {
namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;

constexpr int64_t kVS = Vec::size();
constexpr float kEps = 1e-16f;               // reference.EPS as a float32
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

// ---------------------------------------------------------------- quantizers
// A table holds the per-position parameters: one entry per channel (splat mode) or one per
// position of a (channels x inner) row (lane mode), padded for full vector loads.

// An Op maps x to its integer level r = round(u(x)), clamps it to [lo, hi] and maps the
// clamped level q back to a float value. at::vec::clamp keeps NaN, as torch.clamp does;
// "+ 0" turns -0 into +0, as the reference's out + (surrogate - surrogate) does.

struct SymTable {
  std::vector<float> step;
  float ql, qh;
};

struct SymOp {
  using Table = SymTable;
  Vec step, ql, qh;
  static SymOp splat(const Table& t, int64_t p) { return {Vec(t.step[p]), Vec(t.ql), Vec(t.qh)}; }
  static SymOp lanes(const Table& t, int64_t p) { return {Vec::loadu(t.step.data() + p), Vec(t.ql), Vec(t.qh)}; }
  Vec level(const Vec& x) const { return (x / step).round(); }
  Vec value(const Vec& q) const { return q * step + Vec(0.f); }
  const Vec& lo() const { return ql; }
  const Vec& hi() const { return qh; }
};

struct AsymTable {
  std::vector<float> low, step, zp;
  float n;
};

struct AsymOp {
  using Table = AsymTable;
  Vec low, step, zp, n;
  static AsymOp splat(const Table& t, int64_t p) {
    return {Vec(t.low[p]), Vec(t.step[p]), Vec(t.zp[p]), Vec(t.n)};
  }
  static AsymOp lanes(const Table& t, int64_t p) {
    return {Vec::loadu(t.low.data() + p), Vec::loadu(t.step.data() + p), Vec::loadu(t.zp.data() + p), Vec(t.n)};
  }
  Vec level(const Vec& x) const { return ((x - low) / step).round(); }
  Vec value(const Vec& q) const { return (q - zp) * step + Vec(0.f); }
  Vec lo() const { return Vec(0.f); }
  const Vec& hi() const { return n; }
};

template <typename Op>
inline Vec forward_value(const Op& op, const Vec& x) {
  return op.value(at::vec::clamp(op.level(x), op.lo(), op.hi()));
}

// Per-element contributions of the backward: grad_x and the three sums the parameter
// gradients are made of: g*(out-x) inside, g below, g above.
template <typename Op>
inline void backward_body(const Op& op, const Vec& x, const Vec& g, Vec& dx, Vec& c_in, Vec& c_below,
                          Vec& c_above) {
  const Vec r = op.level(x);
  const Vec q = at::vec::clamp(r, op.lo(), op.hi());
  const Vec out = op.value(q);
  const Vec inside = q == r;  // false for NaN, like (r >= lo) & (r <= hi)
  const Vec above = r > op.hi();
  const Vec below = (inside | above) ^ (Vec(0.f) == Vec(0.f));  // the rest, NaN included
  dx = g & inside;
  // (g inside, 0 outside) * (out - x): outside terms are 0, or NaN for an infinite or NaN x,
  // as in the reference, whose where() passes 0 * slope to the parameter there.
  c_in = dx * (out - x);
  c_below = g & below;
  c_above = g & above;
}

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

struct Sums {
  double in = 0.0, below = 0.0, above = 0.0;
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
    for (int k = 0; k < kV; ++k) ov[k] = forward_value(op[k], xv[k]);
    if constexpr (kStream) {
      if (cnt == kU) {
        stream_store(out + i, ov[0]);
        continue;
      }
    }
    Io<T>::store(out + i, cnt, ov);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// backward_body's accumulation with AVX-512 mask registers (fewer instructions than vector
// masks): the same values, up to the sign of zero sums.
template <typename Op>
inline void backward_step(const Op& op, const Vec& x, const Vec& g, Vec& dx, Vec& a_in, Vec& a_below,
                          Vec& a_above) {
  const __m512 r = op.level(x);
  const __m512 hi = op.hi();
  const __m512 q = at::vec::clamp(Vec(r), op.lo(), op.hi());
  const __m512 out = op.value(Vec(q));
  const __mmask16 inside = _mm512_cmp_ps_mask(q, r, _CMP_EQ_OQ);  // false for NaN
  const __mmask16 above = _mm512_cmp_ps_mask(r, hi, _CMP_GT_OQ);
  const __mmask16 below = _mm512_knot(_mm512_kor(inside, above));  // the rest, NaN included
  const __m512 d = _mm512_maskz_mov_ps(inside, g);
  dx = d;
  a_in = _mm512_add_ps(a_in, _mm512_mul_ps(d, _mm512_sub_ps(out, x)));
  a_below = _mm512_mask_add_ps(a_below, below, a_below, g);
  a_above = _mm512_mask_add_ps(a_above, above, a_above, g);
}
#else
template <typename Op>
inline void backward_step(const Op& op, const Vec& x, const Vec& g, Vec& dx, Vec& a_in, Vec& a_below,
                          Vec& a_above) {
  Vec c_in, c_below, c_above;
  backward_body(op, x, g, dx, c_in, c_below, c_above);
  a_in += c_in;
  a_below += c_below;
  a_above += c_above;
}
#endif

template <typename T, typename Op>
void backward_segment_splat(const T* g, const T* x, T* dx, int64_t n, const Op& op, Sums& sums) {
  constexpr int kV = Io<T>::kVecs;
  constexpr int64_t kU = Io<T>::kUnit;
  Vec a_in(0.f), a_below(0.f), a_above(0.f);
  LaneSum d_in, d_below, d_above;
  Vec xv[kV], gv[kV], dv[kV];
  int64_t units = 0;
  auto flush = [&] {
    d_in.add(a_in);
    d_below.add(a_below);
    d_above.add(a_above);
    a_in = a_below = a_above = Vec(0.f);
  };
  for (int64_t i = 0; i < n; i += kU) {
    const int64_t cnt = std::min(kU, n - i);
    Io<T>::load(x + i, cnt, xv);
    Io<T>::load(g + i, cnt, gv);  // lanes past cnt load as 0 and contribute 0
    for (int k = 0; k < kV; ++k) backward_step(op, xv[k], gv[k], dv[k], a_in, a_below, a_above);
    Io<T>::store(dx + i, cnt, dv);
    if (++units == kFlushUnits) {
      flush();
      units = 0;
    }
  }
  flush();
  sums.in += d_in.total();
  sums.below += d_below.total();
  sums.above += d_above.total();
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
                            float* acc_in, float* acc_below, float* acc_above) {
  constexpr int kV = Io<T>::kVecs;
  constexpr int64_t kU = Io<T>::kUnit;
  Vec xv[kV], gv[kV], dv[kV], c_in, c_below, c_above;
  for (int64_t i = 0; i < n; i += kU) {
    const int64_t cnt = std::min(kU, n - i);
    Io<T>::load(x + i, cnt, xv);
    Io<T>::load(g + i, cnt, gv);
    for (int k = 0; k < kV; ++k) {
      const int64_t off = p + i + k * kVS;
      const int64_t lanes = std::min<int64_t>(kVS, cnt - k * kVS);
      backward_body(Op::lanes(table, off), xv[k], gv[k], dv[k], c_in, c_below, c_above);
      if (lanes > 0) {
        accumulate(acc_in + off, lanes, c_in);
        accumulate(acc_below + off, lanes, c_below);
        accumulate(acc_above + off, lanes, c_above);
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
        result[c].in += s.in;
        result[c].below += s.below;
        result[c].above += s.above;
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
        s.in += base[j];
        s.below += base[L + j];
        s.above += base[2 * L + j];
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

Dense make_dense(const at::Tensor& input, std::optional<int64_t> axis) {
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
at::Tensor empty_like_dense(const Dense& d) {
  return at::Tensor(at::detail::empty_strided_cpu(d.x.sizes(), d.x.strides(), d.x.scalar_type()));
}

// grad with the memory order of d.x (itself when the strides agree, else a copy in d.x's layout).
at::Tensor grad_like_dense(const at::Tensor& grad, const Dense& d) {
  if (grad.strides() == d.x.strides()) return grad;
  at::Tensor g = empty_like_dense(d);
  g.copy_(grad);
  return g;
}

std::optional<int64_t> check_inputs(const at::Tensor& x, std::initializer_list<at::Tensor> params,
                                    std::optional<int64_t> axis) {
  TORCH_CHECK(x.device().is_cpu(), "purecomp fake quantize (CPU kernel): x must be on the CPU");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "purecomp fake quantize: x must be float32, float16 or bfloat16, got ", t);
  std::optional<int64_t> a;
  int64_t expected = 1;
  if (axis.has_value()) {
    TORCH_CHECK(x.dim() > 0 && *axis >= -x.dim() && *axis < x.dim(), "purecomp fake quantize: axis ", *axis,
                " is out of range for an input of ", x.dim(), " dimensions");
    a = *axis < 0 ? *axis + x.dim() : *axis;
    expected = x.size(*a);
  }
  for (const auto& p : params) {
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat,
                "purecomp fake quantize: parameters must be float32 CPU tensors, got ", p.scalar_type());
    TORCH_CHECK(p.numel() == expected && (!a.has_value() || p.dim() == 1),
                "purecomp fake quantize: a parameter must have ", expected, " element(s)",
                a.has_value() ? " and shape (C,)" : "", ", got shape ", p.sizes());
  }
  return a;
}

void check_grad(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "purecomp fake quantize backward: grad must match x in shape, dtype and device");
}

template <typename F>
void dispatch_floating(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "purecomp fake quantize: unsupported dtype ", t);
  }
}

// Per-position table of per-channel values: itself in splat mode, each channel repeated
// `inner` times in lane mode; padded with `fill` for full vector loads.
std::vector<float> layout_table(std::vector<float> per_channel, const Geometry& geo, float fill) {
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
at::Tensor grad_x_buffer(const at::Tensor& grad, const at::Tensor& g, const Dense& d, bool reuse_grad) {
  if (reuse_grad || !g.is_same(grad)) return g;
  return empty_like_dense(d);
}

}  // namespace

// ---------------------------------------------------------------- ops
// The registered CPU kernels are these functions with reuse_grad = false; the autograd kernels
// call them directly for plain CPU tensors (fake_quantize.h).

at::Tensor symmetric_forward_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                                 std::optional<int64_t> axis) {
  TORCH_CHECK(quant_min < quant_max && quant_max > 0, "purecomp fake quantize: need quant_min < quant_max and quant_max > 0");
  const auto a = check_inputs(x, {scale}, axis);
  const Dense d = make_dense(x, a);
  at::Tensor out = empty_like_dense(d);
  const SymParams prm = sym_params(scale, quant_max);
  const SymTable table{layout_table(prm.step, d.geo, 1.f), static_cast<float>(quant_min), static_cast<float>(quant_max)};
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_forward<T, SymOp>(d.x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), d.geo, table);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> symmetric_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& scale, int64_t quant_min,
                                                          int64_t quant_max, std::optional<int64_t> axis,
                                                          bool reuse_grad) {
  TORCH_CHECK(quant_min < quant_max && quant_max > 0, "purecomp fake quantize: need quant_min < quant_max and quant_max > 0");
  const auto a = check_inputs(x, {scale}, axis);
  check_grad(grad, x);
  const Dense d = make_dense(x, a);
  const at::Tensor g = grad_like_dense(grad, d);
  at::Tensor grad_x = grad_x_buffer(grad, g, d, reuse_grad);
  const SymParams prm = sym_params(scale, quant_max);
  const SymTable table{layout_table(prm.step, d.geo, 1.f), static_cast<float>(quant_min), static_cast<float>(quant_max)};
  std::vector<Sums> sums;
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    sums = run_backward<T, SymOp>(g.const_data_ptr<T>(), d.x.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(),
                                  d.geo, table);
  });
  at::Tensor grad_scale = at::Tensor(at::detail::empty_strided_cpu(scale.sizes(), c10::contiguous_strides(scale.sizes()), at::kFloat));
  float* gs = grad_scale.mutable_data_ptr<float>();
  const double below_factor = static_cast<double>(quant_min) / static_cast<double>(quant_max);
  for (int64_t c = 0; c < static_cast<int64_t>(sums.size()); ++c) {
    const Sums& s = sums[c];
    gs[c] = static_cast<float>(prm.sign[c] * (s.in / prm.s[c] + s.above + s.below * below_factor));
  }
  return {grad_x, grad_scale};
}

at::Tensor asymmetric_forward_cpu(const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
                                  int64_t levels, std::optional<int64_t> axis) {
  TORCH_CHECK(levels > 0, "purecomp fake quantize: levels must be positive");
  const auto a = check_inputs(x, {input_low, input_range}, axis);
  const Dense d = make_dense(x, a);
  at::Tensor out = empty_like_dense(d);
  const AsymParams prm = asym_params(input_low, input_range, levels);
  const AsymTable table{layout_table(prm.low, d.geo, 0.f), layout_table(prm.step, d.geo, 1.f),
                        layout_table(prm.zp, d.geo, 0.f), static_cast<float>(levels)};
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run_forward<T, AsymOp>(d.x.const_data_ptr<T>(), out.mutable_data_ptr<T>(), d.geo, table);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> asymmetric_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
    int64_t levels, std::optional<int64_t> axis, bool reuse_grad) {
  TORCH_CHECK(levels > 0, "purecomp fake quantize: levels must be positive");
  const auto a = check_inputs(x, {input_low, input_range}, axis);
  check_grad(grad, x);
  const Dense d = make_dense(x, a);
  const at::Tensor g = grad_like_dense(grad, d);
  at::Tensor grad_x = grad_x_buffer(grad, g, d, reuse_grad);
  const AsymParams prm = asym_params(input_low, input_range, levels);
  const AsymTable table{layout_table(prm.low, d.geo, 0.f), layout_table(prm.step, d.geo, 1.f),
                        layout_table(prm.zp, d.geo, 0.f), static_cast<float>(levels)};
  std::vector<Sums> sums;
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    sums = run_backward<T, AsymOp>(g.const_data_ptr<T>(), d.x.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(),
                                   d.geo, table);
  });
  const auto param_strides = c10::contiguous_strides(input_low.sizes());
  at::Tensor grad_low = at::Tensor(at::detail::empty_strided_cpu(input_low.sizes(), param_strides, at::kFloat));
  at::Tensor grad_range = at::Tensor(at::detail::empty_strided_cpu(input_range.sizes(),
                                                                   c10::contiguous_strides(input_range.sizes()), at::kFloat));
  float* gl = grad_low.mutable_data_ptr<float>();
  float* gr = grad_range.mutable_data_ptr<float>();
  for (int64_t c = 0; c < static_cast<int64_t>(sums.size()); ++c) {
    const Sums& s = sums[c];
    gl[c] = static_cast<float>(s.above + s.below);
    gr[c] = static_cast<float>(prm.sign[c] * (s.in / prm.range[c] + s.above));
  }
  return {grad_x, grad_low, grad_range};
}

namespace {

std::tuple<at::Tensor, at::Tensor> fake_quantize_symmetric_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& scale, int64_t quant_min,
                                                                    int64_t quant_max, std::optional<int64_t> axis) {
  return symmetric_backward_cpu(grad, x, scale, quant_min, quant_max, axis, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_asymmetric_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& input_low, const at::Tensor& input_range,
    int64_t levels, std::optional<int64_t> axis) {
  return asymmetric_backward_cpu(grad, x, input_low, input_range, levels, axis, false);
}

}  // namespace

// ---------------------------------------------------------------- parameters
// Same float32 operations, in the same order, as reference.py.

namespace {
inline float sgn(float v) { return static_cast<float>((v > 0.f) - (v < 0.f)); }
}  // namespace

// Element c of a per-tensor (numel 1, any shape) or per-channel (1-D, any stride) parameter.
struct ParamReader {
  const float* p;
  int64_t stride;
  explicit ParamReader(const at::Tensor& t) : p(t.const_data_ptr<float>()), stride(t.dim() == 1 ? t.stride(0) : 0) {}
  float operator[](int64_t c) const { return p[c * stride]; }
};

SymParams sym_params(const at::Tensor& scale, int64_t qh) {
  const ParamReader p(scale);
  const int64_t C = scale.numel();
  SymParams out{std::vector<float>(C), std::vector<float>(C), std::vector<float>(C)};
  for (int64_t c = 0; c < C; ++c) {
    out.s[c] = std::fabs(p[c]) + kEps;
    out.step[c] = out.s[c] / static_cast<float>(qh);
    out.sign[c] = sgn(p[c]);
  }
  return out;
}

// reference.adjust_asymmetric_range, then step = range / n and zp = round(-low / step).
AsymParams asym_params(const at::Tensor& input_low, const at::Tensor& input_range, int64_t levels) {
  const ParamReader lo_p(input_low), rg_p(input_range);
  const int64_t C = input_low.numel();
  const float n = static_cast<float>(levels);
  AsymParams out;
  for (auto* v : {&out.low, &out.range, &out.step, &out.zp, &out.sign}) v->resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const float raw_low = lo_p[c];
    const float raw_range = std::fabs(rg_p[c]) + kEps;
    const float l1 = std::min(raw_low, 0.f);
    const float h1 = std::max(raw_low + raw_range, 0.f);
    const float z = std::nearbyint(-l1 * n / (h1 - l1));
    const bool interior = z > 0.f && z < n;
    const float safe_z = interior ? z : 1.f;
    const float t = (safe_z - n) / safe_z;
    const float h2 = t * l1;
    const float l2 = h1 / (interior ? t : -1.f);
    const bool take_low_end = (h2 - l1) > (h1 - l2);
    const float adj_low = (interior && !take_low_end) ? l2 : l1;
    const float adj_high = (interior && take_low_end) ? h2 : h1;
    const float range = adj_high - adj_low;
    const float step = range / n;
    out.low[c] = adj_low;
    out.range[c] = range;
    out.step[c] = step;
    out.zp[c] = std::nearbyint(-adj_low / step);
    out.sign[c] = sgn(rg_p[c]);
  }
  return out;
}

TORCH_LIBRARY(purecomp, m) {
  // Fake (meta) kernels are registered from this Python module (torch.library.register_fake).
  m.set_python_module("purecomp.ops._registration");
  m.def("fake_quantize_symmetric(Tensor x, Tensor scale, int quant_min, int quant_max, int? axis=None) -> Tensor");
  m.def(
      "fake_quantize_symmetric_backward(Tensor grad, Tensor x, Tensor scale, int quant_min, int quant_max, "
      "int? axis=None) -> (Tensor, Tensor)");
  m.def(
      "fake_quantize_asymmetric(Tensor x, Tensor input_low, Tensor input_range, int levels, int? axis=None) "
      "-> Tensor");
  m.def(
      "fake_quantize_asymmetric_backward(Tensor grad, Tensor x, Tensor input_low, Tensor input_range, int levels, "
      "int? axis=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(purecomp, CPU, m) {
  m.impl("fake_quantize_symmetric", &symmetric_forward_cpu);
  m.impl("fake_quantize_symmetric_backward", &fake_quantize_symmetric_backward);
  m.impl("fake_quantize_asymmetric", &asymmetric_forward_cpu);
  m.impl("fake_quantize_asymmetric_backward", &fake_quantize_asymmetric_backward);
}

}  // namespace purecomp
