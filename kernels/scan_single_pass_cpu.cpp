#include <stdexcept>
#include <vector>

#include "kernels/scan_single_pass.h"

namespace pnewton {
namespace {

template <typename T, int K, int S>
void single_pass_typed(const ScanParams& p, int64_t publish_every) {
  constexpr int E = element_size<K>();
  const SinglePassGeometry geo = single_pass_geometry(p, S);
  const int64_t slots = geo.groups * geo.tiles * geo.C;
  std::vector<int> flag(slots, kNothing);
  std::vector<T> M(slots * K * K), v(slots * K), state(slots * K);
  const SinglePassStatus<T> st{flag.data(), M.data(), v.data(), state.data()};
  // The block's registers and shared memory.
  std::vector<SinglePassSlice<T, T, K, S>> slices(kSinglePassThreads);
  std::vector<T> buf[2] = {std::vector<T>(kSinglePassThreads * E), std::vector<T>(kSinglePassThreads * E)};
  std::vector<T> entering(geo.C * K);
  for (int64_t id = 0; id < geo.groups * geo.tiles; ++id) {
    const int64_t j = id / geo.groups, g = id % geo.groups, bi = g / geo.head_groups;
    auto lane = [&](int64_t tid, int64_t* c, int64_t* q, int64_t* h) {
      *c = tid % geo.C, *q = tid / geo.C, *h = (g % geo.head_groups) * geo.C + *c;
    };
    for (int64_t tid = 0; tid < kSinglePassThreads; ++tid) {  // 1. load and fold
      int64_t c, q, h;
      lane(tid, &c, &q, &h);
      slices[tid].load(p, bi, h, h < p.H ? j * geo.L + q * S : p.T);
      slices[tid].aggregate(&buf[0][tid * E], &buf[0][tid * E + K * K]);
    }
    int cur = 0;
    for (int64_t d = 1; d < geo.P; d *= 2, cur = 1 - cur) {  // 2. slice scan
      for (int64_t tid = 0; tid < kSinglePassThreads; ++tid) {
        int64_t c, q, h;
        lane(tid, &c, &q, &h);
        slice_scan_round<K>(buf[cur].data(), buf[1 - cur].data(), geo.C, q, c, d);
      }
    }
    for (int64_t c = 0; c < geo.C; ++c) {  // 3. look-back
      const int64_t h = (g % geo.head_groups) * geo.C + c;
      T initial[K] = {};
      if (h < p.H) load_initial_state<K, T, T>(p, bi, h, initial);
      const T* total = &buf[cur][((geo.P - 1) * geo.C + c) * E];
      look_back<K>(st, geo, g, j, c, total, total + K * K, initial, &entering[c * K], j % publish_every == 0);
    }
    for (int64_t tid = 0; tid < kSinglePassThreads; ++tid) {  // 4. rescan
      int64_t c, q, h;
      lane(tid, &c, &q, &h);
      if (h >= p.H) continue;
      T s[K];
      slice_entering_state<K>(buf[cur].data(), geo.C, q, c, &entering[c * K], s);
      slices[tid].rescan(p, bi, h, j * geo.L + q * S, s);
    }
  }
}

template <typename T>
void single_pass_dispatch(const ScanParams& p, int64_t publish_every, int steps) {
  if (p.k == 1 && steps == 8) return single_pass_typed<T, 1, 8>(p, publish_every);
  if (p.k == 1 && steps == 16) return single_pass_typed<T, 1, 16>(p, publish_every);
  if (p.k == 1 && steps == 32) return single_pass_typed<T, 1, 32>(p, publish_every);
  if (p.k == 2 && steps == 4) return single_pass_typed<T, 2, 4>(p, publish_every);
  if (p.k == 2 && steps == 8) return single_pass_typed<T, 2, 8>(p, publish_every);
  throw std::invalid_argument("pnewton::scan_single_pass_cpu: the single-pass scan takes k = 1 (8, 16, 32 steps) "
                              "or k = 2 (4, 8 steps)");
}

}  // namespace

void scan_single_pass_cpu(const ScanParams& p, DType dtype, int64_t publish_every, int steps) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return;
  if (publish_every < 1) throw std::invalid_argument("pnewton::scan_single_pass_cpu: publish_every must be >= 1");
  if (steps == 0) steps = default_single_pass_steps(p.k);
  switch (dtype) {
    case DType::f32: return single_pass_dispatch<float>(p, publish_every, steps);
    case DType::f64: return single_pass_dispatch<double>(p, publish_every, steps);
    default: throw std::invalid_argument("pnewton::scan_single_pass_cpu: only f32 and f64");
  }
}

}  // namespace pnewton
