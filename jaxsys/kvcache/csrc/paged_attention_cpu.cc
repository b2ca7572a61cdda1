// Attention of a few queries per sequence over that sequence's KV pages, for XLA:CPU.
//
// The jnp formulation (`jaxsys.nanobatch.scan_attention`) gathers each block of pages
// into a fresh array before its dots read it: on CPU that copy, and the loop around it,
// cost more than the arithmetic. Here every key and value row is read once, in place,
// from the pool: per (sequence, KV head) the queries of that head's group walk the
// sequence's pages with an online softmax (FlashDecoding's split-K over pages, one
// split), keeping the page's 16 x head_dim keys and values in L1 across the queries.
//
// Inputs:  q [b, T, H, hd] f32, k_pool, v_pool [kvH, num_pages, page_size, hd] f32,
//          table [b, W] s32 (page ids; out-of-range ids are clamped), start [b] s32
//          (keys at positions < start are visible to every query of the row).
// Outputs: out [b, T, H, hd] f32, lse [b, T, H] f32 (natural log; a row without keys
//          gets out 0 and lse -inf, so it merges with other parts).
//
// Work items are (row, KV head) pairs, claimed under one mutex by the calling
// thread and tasks on XLA's intra-op thread pool; the caller waits only for items a
// task has claimed, so a task that never gets a thread cannot block the call.

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* table;
  const int32_t* start;
  float* out;
  float* lse;
  int64_t b, t, h, hd, kv_heads, num_pages, page_size, width;
};

// exp(x) for x <= 0 (scores minus their running maximum): Cephes' single-precision
// polynomial (about 1 ulp), branch-free so the compiler vectorizes it over a page's keys.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);  // below: a weight under 2^-125 (a key at most ~1e-38 of the maximum)
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float y = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// One (row, KV head): the group's T x G queries over the row's first start[row] keys, a
// page at a time: scores of every query against the page's keys, their online-softmax
// weights, then the weighted values. HD > 0 fixes head_dim at compile time (0: p.hd).
template <int64_t HD>
void Attend(const Problem& p, int64_t row, int64_t kv_head) {
  const int64_t hd = HD > 0 ? HD : p.hd;
  const int64_t groups = p.h / p.kv_heads;
  const int64_t n = p.t * groups;
  const int64_t ps = p.page_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<float> q(n * hd), acc(n * hd, 0.0f), top(n, -std::numeric_limits<float>::infinity()),
      total(n, 0.0f), weights(n * ps);
  for (int64_t i = 0; i < p.t; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* src = p.q + ((row * p.t + i) * p.h + kv_head * groups + g) * hd;
      float* dst = q.data() + (i * groups + g) * hd;
      for (int64_t d = 0; d < hd; ++d) dst[d] = src[d] * scale;
    }
  }
  const int64_t length = std::min<int64_t>(std::max<int32_t>(p.start[row], 0), p.width * ps);
  for (int64_t first = 0; first < length; first += ps) {
    int64_t page = p.table[row * p.width + first / ps];
    page = std::min<int64_t>(std::max<int64_t>(page, 0), p.num_pages - 1);
    const int64_t count = std::min(ps, length - first);
    const float* keys = p.k + (kv_head * p.num_pages + page) * ps * hd;
    const float* values = p.v + (kv_head * p.num_pages + page) * ps * hd;
    for (int64_t j = 0; j < count; ++j) {
      const float* kj = keys + j * hd;
      for (int64_t i = 0; i < n; ++i) {
        const float* qi = q.data() + i * hd;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < hd; ++d) s += qi[d] * kj[d];
        weights[i * ps + j] = s;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      float* wi = weights.data() + i * ps;
      float page_top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < count; ++j) page_top = std::max(page_top, wi[j]);
      const float new_top = std::max(top[i], page_top);
      const float rescale = std::exp(top[i] - new_top);  // 0 while top is -inf
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < count; ++j) {
        wi[j] = ExpNonPositive(wi[j] - new_top);
        sum += wi[j];
      }
      total[i] = total[i] * rescale + sum;
      top[i] = new_top;
      float* ai = acc.data() + i * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) ai[d] *= rescale;
    }
    for (int64_t j = 0; j < count; ++j) {
      const float* vj = values + j * hd;
      for (int64_t i = 0; i < n; ++i) {
        const float w = weights[i * ps + j];
        float* ai = acc.data() + i * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) ai[d] += w * vj[d];
      }
    }
  }
  for (int64_t i = 0; i < p.t; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t qi = i * groups + g, head = kv_head * groups + g;
      float* dst = p.out + ((row * p.t + i) * p.h + head) * hd;
      const bool has_keys = total[qi] > 0.0f;
      const float inv = has_keys ? 1.0f / total[qi] : 0.0f;
      for (int64_t d = 0; d < hd; ++d) dst[d] = acc[qi * hd + d] * inv;
      p.lse[(row * p.t + i) * p.h + head] =
          has_keys ? top[qi] + std::log(total[qi]) : -std::numeric_limits<float>::infinity();
    }
  }
}

void AttendItem(const Problem& p, int64_t row, int64_t kv_head) {
  switch (p.hd) {
    case 64: return Attend<64>(p, row, kv_head);
    case 128: return Attend<128>(p, row, kv_head);
    default: return Attend<0>(p, row, kv_head);
  }
}

struct Shared {
  Problem problem;
  int64_t items;
  int64_t next = 0;  // the next unclaimed item
  std::mutex mutex;
  std::condition_variable idle;
  int64_t claimed_unfinished = 0;  // items a worker took and has not finished

  void Work() {
    while (true) {
      int64_t item;
      {
        std::lock_guard<std::mutex> lock(mutex);
        item = next++;
        if (item >= items) return;
        ++claimed_unfinished;
      }
      AttendItem(problem, item / problem.kv_heads, item % problem.kv_heads);
      std::lock_guard<std::mutex> lock(mutex);
      if (--claimed_unfinished == 0) idle.notify_all();
    }
  }
};

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> start,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions(),
       sd = start.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 || sd.size() != 1)
    return ffi::Error::InvalidArgument("paged attention: want q [b,T,H,hd], pools [kvH,pages,page,hd], "
                                       "table [b,W], start [b]");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("paged attention: key and value pools differ in shape");
  const int64_t b = qd[0], h = qd[2], hd = qd[3], kv_heads = kd[0];
  if (kd[3] != hd || kv_heads < 1 || h % kv_heads != 0 || td[0] != b || sd[0] != b)
    return ffi::Error::InvalidArgument("paged attention: head_dim, head groups or batch do not match");
  if (kd[1] < 1 || kd[2] < 1)
    return ffi::Error::InvalidArgument("paged attention: the pools hold no pages, or pages of no tokens");
  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{q.typed_data(), k.typed_data(), v.typed_data(), table.typed_data(),
                            start.typed_data(), out->typed_data(), lse->typed_data(),
                            b, qd[1], h, hd, kv_heads, kd[1], kd[2], td[1]};
  shared->items = b * kv_heads;
  // The calling thread works too, so one helper fewer than the pool's threads; a call of a few items (one
  // decode row: tens of microseconds) is cheaper done inline than handed over.
  const int64_t helpers = shared->items < 4 ? 0 : std::min<int64_t>(pool.num_threads() - 1, shared->items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->idle.wait(lock, [&] { return shared->claimed_unfinished == 0; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsysPagedAttentionCpu, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
