// Tests of the torch-free scan kernels: the element algebra, and the CPU scans (plain and
// chunked over time) against a sequential loop written out in full here.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/scan_chunked.h"
#include "kernels/scan_cpu.h"
#include "kernels/scan_element.h"
#include "kernels/scan_single_pass.h"

namespace pnewton {
namespace {

// ---- the element and its combine --------------------------------------------------------

template <int K>
Affine<double, K> random_element(std::mt19937& rng) {
  std::normal_distribution<double> normal;
  Affine<double, K> e;
  for (double& m : e.M) m = normal(rng);
  for (double& v : e.v) v = normal(rng);
  return e;
}

template <int K>
void expect_near(const Affine<double, K>& x, const Affine<double, K>& y, double tol) {
  for (int i = 0; i < K * K; ++i) EXPECT_NEAR(x.M[i], y.M[i], tol);
  for (int i = 0; i < K; ++i) EXPECT_NEAR(x.v[i], y.v[i], tol);
}

TEST(AffineElement, ComposeIsAssociative) {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 20; ++trial) {
    auto e1 = random_element<3>(rng), e2 = random_element<3>(rng), e3 = random_element<3>(rng);
    expect_near(compose(compose(e1, e2), e3), compose(e1, compose(e2, e3)), 1e-12);
  }
}

TEST(AffineElement, IdentityIsNeutralOnBothSides) {
  std::mt19937 rng(2);
  auto e = random_element<4>(rng);
  const auto id = Affine<double, 4>::identity();
  expect_near(compose(id, e), e, 0.0);
  expect_near(compose(e, id), e, 0.0);
}

TEST(AffineElement, ComposeAppliesEarlierFirst) {
  std::mt19937 rng(3);
  auto earlier = random_element<2>(rng), later = random_element<2>(rng);
  const double x[2] = {0.5, -1.5};
  double mid[2], expected[2], got[2];
  apply(earlier, x, mid);
  apply(later, mid, expected);
  apply(compose(earlier, later), x, got);
  EXPECT_NEAR(got[0], expected[0], 1e-12);
  EXPECT_NEAR(got[1], expected[1], 1e-12);
  // And the other order is a different map: the combine is not commutative.
  double swapped[2];
  apply(compose(later, earlier), x, swapped);
  EXPECT_GT(std::abs(swapped[0] - got[0]) + std::abs(swapped[1] - got[1]), 1e-6);
}

TEST(AffineElement, DiagonalComposeIsScalarRecurrence) {
  Affine<float, 1> e1{{0.5f}, {2.0f}}, e2{{-3.0f}, {1.0f}};
  auto c = compose(e1, e2);
  EXPECT_EQ(c.M[0], -1.5f);         // a2 * a1
  EXPECT_EQ(c.v[0], -3.0f * 2.0f + 1.0f);  // a2 * b1 + b2
}

// ---- scans against the sequential loop -------------------------------------------------

// A scan problem in contiguous [B, T, H, k(, k)] storage.
template <typename T>
struct Problem {
  int64_t B, Tn, H, k;
  std::vector<T> A, b, x0, x;

  Problem(int64_t B_, int64_t T_, int64_t H_, int64_t k_) : B(B_), Tn(T_), H(H_), k(k_) {
    A.resize(B * Tn * H * k * k);
    b.resize(B * Tn * H * k);
    x0.resize(B * H * k);
    x.assign(B * Tn * H * k, T(-777));
  }

  ScanParams params(bool reverse, bool transpose, bool shift, bool with_x0) {
    ScanParams p;
    p.B = B, p.T = Tn, p.H = H, p.k = k;
    p.A = A.data();
    const int64_t As[5] = {Tn * H * k * k, H * k * k, k * k, k, 1};
    std::copy(As, As + 5, p.A_stride);
    p.b = b.data();
    const int64_t bs[4] = {Tn * H * k, H * k, k, 1};
    std::copy(bs, bs + 4, p.b_stride);
    p.x = x.data();
    std::copy(bs, bs + 4, p.x_stride);
    if (with_x0) {
      p.x0 = x0.data();
      const int64_t x0s[3] = {H * k, k, 1};
      std::copy(x0s, x0s + 3, p.x0_stride);
    }
    p.reverse = reverse, p.transpose = transpose, p.shift = shift;
    return p;
  }

  // x computed step by step, in double, straight from the definition in scan_params.h.
  std::vector<double> reference(const ScanParams& p) const {
    std::vector<double> out(x.size());
    for (int64_t bi = 0; bi < B; ++bi) {
      for (int64_t h = 0; h < H; ++h) {
        std::vector<double> s(k, 0.0), next(k);
        if (p.x0 && !p.shift) {
          for (int64_t i = 0; i < k; ++i) s[i] = x0[(bi * H + h) * k + i];
        }
        for (int64_t pos = 0; pos < Tn; ++pos) {
          const int64_t t = p.reverse ? Tn - 1 - pos : pos;
          const int64_t ta = !p.shift ? t : (pos == 0 ? -1 : (p.reverse ? t + 1 : t - 1));
          for (int64_t i = 0; i < k; ++i) {
            double acc = b[((bi * Tn + t) * H + h) * k + i];
            for (int64_t j = 0; ta >= 0 && j < k; ++j) {
              const int64_t base = ((bi * Tn + ta) * H + h) * k * k;
              acc += double(p.transpose ? A[base + j * k + i] : A[base + i * k + j]) * s[j];
            }
            next[i] = acc;
          }
          s = next;
          for (int64_t i = 0; i < k; ++i) out[((bi * Tn + t) * H + h) * k + i] = s[i];
        }
      }
    }
    return out;
  }
};

void serial_for(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body) {
  if (begin < end) body(begin, end);
}

// Splits the range over real threads, one subrange each, to catch races between tasks.
void threaded_for(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t n = 3, len = (end - begin + n - 1) / n;
  std::vector<std::thread> threads;
  for (int64_t s = begin; s < end; s += len) threads.emplace_back(body, s, std::min(end, s + len));
  for (auto& t : threads) t.join();
}

template <typename T>
void fill_random(Problem<T>& pr, std::mt19937& rng, double a_scale) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  // Contracting on average (|A| entries ~ a_scale / k) so long scans stay finite.
  for (T& v : pr.A) v = T(u(rng) * a_scale / pr.k);
  for (T& v : pr.b) v = T(u(rng));
  for (T& v : pr.x0) v = T(u(rng));
}

struct ScanCase {
  int64_t T, k;
};

class ScanVsSequential : public ::testing::TestWithParam<ScanCase> {};

TEST_P(ScanVsSequential, MatchesLoopInEveryDirectionAndSchedule) {
  const auto [Tn, k] = GetParam();
  std::mt19937 rng(static_cast<unsigned>(Tn * 31 + k));
  Problem<double> pr(2, Tn, 3, k);
  fill_random(pr, rng, 1.8);
  for (int flags = 0; flags < 16; ++flags) {
    const bool reverse = flags & 1, transpose = flags & 2, shift = flags & 4, with_x0 = flags & 8;
    const ScanParams p = pr.params(reverse, transpose, shift, with_x0);
    const auto expected = pr.reference(p);
    for (int64_t chunks : {int64_t(1), int64_t(3), int64_t(7), int64_t(64)}) {
      for (int64_t tile : {int64_t(1), int64_t(2), int64_t(3)}) {
        std::fill(pr.x.begin(), pr.x.end(), -777.0);
        scan_cpu(p, DType::f64, CpuSchedule{tile, chunks}, chunks % 2 ? ParallelFor(threaded_for) : serial_for);
        for (size_t i = 0; i < expected.size(); ++i) {
          ASSERT_NEAR(pr.x[i], expected[i], 1e-12 * (1 + std::abs(expected[i])))
              << "T=" << Tn << " k=" << k << " flags=" << flags << " chunks=" << chunks << " tile=" << tile
              << " at " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AwkwardLengths, ScanVsSequential,
                         ::testing::Values(ScanCase{1, 1}, ScanCase{2, 1}, ScanCase{31, 1}, ScanCase{32, 1},
                                           ScanCase{33, 1}, ScanCase{1000, 1}, ScanCase{4097, 1}, ScanCase{33, 2},
                                           ScanCase{1000, 3}, ScanCase{4097, 4}, ScanCase{31, 5}, ScanCase{32, 6},
                                           ScanCase{33, 7}, ScanCase{1000, 8}, ScanCase{33, 11}));

// ---- the CUDA single-pass decomposition, run by its CPU mirror ----------------------------

struct SinglePassCase {
  int64_t T, H, k;
};

class SinglePassMirror : public ::testing::TestWithParam<SinglePassCase> {};

// Lengths around the slice (S), tile (L) and channel-group (C = 32) boundaries; look-backs
// that find the predecessor's state at once, and ones that compose up to 3 aggregates.
TEST_P(SinglePassMirror, MatchesLoopAtTileSliceAndChannelBoundaries) {
  const auto [Tn, H, k] = GetParam();
  std::mt19937 rng(static_cast<unsigned>(Tn * 131 + H * 7 + k));
  Problem<double> pr(2, Tn, H, k);
  fill_random(pr, rng, 1.8);
  for (int steps : {4, 8, 16, 32}) {
    if (!single_pass_steps_supported(k, steps)) continue;
    const SinglePassGeometry geo = single_pass_geometry(pr.params(false, false, false, false), steps);
    EXPECT_EQ(geo.C * geo.P, kSinglePassThreads);
    for (int flags = 0; flags < 16; ++flags) {
      const bool reverse = flags & 1, transpose = flags & 2, shift = flags & 4, with_x0 = flags & 8;
      const ScanParams p = pr.params(reverse, transpose, shift, with_x0);
      const auto expected = pr.reference(p);
      for (int64_t publish_every : {int64_t(1), int64_t(4)}) {
        std::fill(pr.x.begin(), pr.x.end(), -777.0);
        scan_single_pass_cpu(p, DType::f64, publish_every, steps);
        for (size_t i = 0; i < expected.size(); ++i) {
          ASSERT_NEAR(pr.x[i], expected[i], 1e-12 * (1 + std::abs(expected[i])))
              << "T=" << Tn << " H=" << H << " k=" << k << " flags=" << flags << " publish_every=" << publish_every
              << " steps=" << steps << " (L=" << geo.L << ", C=" << geo.C << ") at " << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Boundaries, SinglePassMirror,
    ::testing::Values(SinglePassCase{1, 1, 1}, SinglePassCase{17, 1, 1}, SinglePassCase{4095, 1, 1},
                      SinglePassCase{4097, 1, 1}, SinglePassCase{13000, 1, 1}, SinglePassCase{1023, 3, 1},
                      SinglePassCase{1025, 3, 1}, SinglePassCase{127, 32, 1}, SinglePassCase{129, 33, 1},
                      SinglePassCase{600, 64, 1}, SinglePassCase{2049, 1, 2}, SinglePassCase{4200, 1, 2}, SinglePassCase{9000, 1, 2}, SinglePassCase{20000, 1, 1},
                      SinglePassCase{257, 5, 2}, SinglePassCase{131, 40, 2}),
    [](const ::testing::TestParamInfo<SinglePassCase>& info) {
      return "T" + std::to_string(info.param.T) + "_H" + std::to_string(info.param.H) + "_k" +
             std::to_string(info.param.k);
    });

TEST(SinglePassMirror, FloatStorageAndBadArguments) {
  std::mt19937 rng(9);
  Problem<float> pr(3, 5000, 7, 1);
  fill_random(pr, rng, 1.9);
  const ScanParams p = pr.params(true, false, false, true);
  scan_single_pass_cpu(p, DType::f32, 2);
  const auto expected = pr.reference(p);
  for (size_t i = 0; i < expected.size(); ++i) ASSERT_NEAR(pr.x[i], expected[i], 1e-4 * (1 + std::abs(expected[i])));
  Problem<double> wide(1, 10, 1, 3);
  EXPECT_THROW(scan_single_pass_cpu(wide.params(false, false, false, false), DType::f64), std::invalid_argument);
  EXPECT_THROW(scan_single_pass_cpu(p, DType::f32, 0), std::invalid_argument);
  EXPECT_THROW(scan_single_pass_cpu(p, DType::f32, 1, 12), std::invalid_argument);
}

// ---- the CUDA chunked scan, run by its CPU mirror ---------------------------------------

struct ChunkedCase {
  int64_t T, H, k;
};

class ChunkedMirror : public ::testing::TestWithParam<ChunkedCase> {};

// Block sizes of the register aggregate (k <= 8) and of the column one (9..16, one
// instantiation for all); one chunk, chunks that do not divide T, more chunks than steps
// (empty ones), every flag.
TEST_P(ChunkedMirror, MatchesLoopForEveryChunkingAndFlag) {
  const auto [Tn, H, k] = GetParam();
  std::mt19937 rng(static_cast<unsigned>(Tn * 17 + H * 5 + k));
  Problem<double> pr(2, Tn, H, k);
  fill_random(pr, rng, 1.8);
  EXPECT_EQ(chunk_threads(k), k > kMaxRegisterBlock ? k + 1 : 1);
  for (int flags = 0; flags < 16; ++flags) {
    const bool reverse = flags & 1, transpose = flags & 2, shift = flags & 4, with_x0 = flags & 8;
    const ScanParams p = pr.params(reverse, transpose, shift, with_x0);
    const auto expected = pr.reference(p);
    for (int64_t n_chunks : {int64_t(1), int64_t(3), int64_t(7), Tn, Tn + 5}) {
      std::fill(pr.x.begin(), pr.x.end(), -777.0);
      scan_chunked_cpu(p, DType::f64, n_chunks);
      for (size_t i = 0; i < expected.size(); ++i) {
        ASSERT_NEAR(pr.x[i], expected[i], 1e-12 * (1 + std::abs(expected[i])))
            << "T=" << Tn << " H=" << H << " k=" << k << " flags=" << flags << " chunks=" << n_chunks << " at " << i;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    BlockSizes, ChunkedMirror,
    ::testing::Values(ChunkedCase{1, 1, 1}, ChunkedCase{50, 3, 1}, ChunkedCase{41, 2, 3}, ChunkedCase{64, 3, 8},
                      ChunkedCase{33, 2, 9}, ChunkedCase{29, 3, 12}, ChunkedCase{40, 2, 16}),
    [](const ::testing::TestParamInfo<ChunkedCase>& info) {
      return "T" + std::to_string(info.param.T) + "_H" + std::to_string(info.param.H) + "_k" +
             std::to_string(info.param.k);
    });

TEST(ChunkedMirror, FloatStorageAndBadArguments) {
  std::mt19937 rng(10);
  Problem<float> pr(2, 300, 3, 16);
  fill_random(pr, rng, 1.5);
  const ScanParams p = pr.params(true, true, false, true);
  scan_chunked_cpu(p, DType::f32, 6);
  const auto expected = pr.reference(p);
  for (size_t i = 0; i < expected.size(); ++i) ASSERT_NEAR(pr.x[i], expected[i], 1e-4 * (1 + std::abs(expected[i])));
  Problem<double> wide(1, 10, 1, kMaxChunkedBlock + 1);
  EXPECT_THROW(scan_chunked_cpu(wide.params(false, false, false, false), DType::f64, 2), std::invalid_argument);
  EXPECT_THROW(scan_chunked_cpu(p, DType::f32, 0), std::invalid_argument);
}

TEST(ScanCpu, DefaultScheduleMatchesLoopWhenNarrowAndLong) {
  // B·H too small to feed the threads: the default schedule cuts time into chunks.
  std::mt19937 rng(5);
  Problem<float> pr(1, 20000, 1, 1);
  fill_random(pr, rng, 1.9);
  const ScanParams p = pr.params(false, false, false, true);
  const CpuSchedule s = default_cpu_schedule(p, 4);
  EXPECT_GT(s.time_chunks, 1);
  scan_cpu(p, DType::f32, s, threaded_for);
  const auto expected = pr.reference(p);
  // fp32 against a double loop: relative error of a few ulps per step of memory.
  for (size_t i = 0; i < expected.size(); ++i) ASSERT_NEAR(pr.x[i], expected[i], 1e-5 * (1 + std::abs(expected[i]))) << i;
}

TEST(ScanCpu, BitExactWithSignMultipliersAndSmallIntegers) {
  // ±1 multipliers and small integer inputs keep every partial result an exactly
  // representable integer, so any schedule must reproduce the loop bit for bit.
  std::mt19937 rng(6);
  std::uniform_int_distribution<int> sign(0, 1), small(-3, 3);
  Problem<float> pr(3, 4097, 5, 1);
  for (float& v : pr.A) v = sign(rng) ? 1.0f : -1.0f;
  for (float& v : pr.b) v = float(small(rng));
  for (float& v : pr.x0) v = float(small(rng));
  for (bool reverse : {false, true}) {
    const ScanParams p = pr.params(reverse, false, false, true);
    const auto expected = pr.reference(p);
    for (int64_t chunks : {int64_t(1), int64_t(5), int64_t(64)}) {
      scan_cpu(p, DType::f32, CpuSchedule{2, chunks}, threaded_for);
      for (size_t i = 0; i < expected.size(); ++i) ASSERT_EQ(pr.x[i], float(expected[i])) << i;
    }
  }
}

TEST(ScanCpu, BitExactWithPermutationBlocks) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-4, 4);
  const int64_t k = 4;
  Problem<float> pr(2, 1000, 3, k);
  std::vector<int> perm = {0, 1, 2, 3};
  for (int64_t blk = 0; blk < pr.B * pr.Tn * pr.H; ++blk) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < k; ++j) pr.A[blk * k * k + i * k + j] = perm[i] == j ? 1.0f : 0.0f;
    }
  }
  for (float& v : pr.b) v = float(small(rng));
  for (float& v : pr.x0) v = float(small(rng));
  for (int flags = 0; flags < 8; ++flags) {
    const ScanParams p = pr.params(flags & 1, flags & 2, flags & 4, true);
    const auto expected = pr.reference(p);
    scan_cpu(p, DType::f32, CpuSchedule{1, 4}, threaded_for);
    for (size_t i = 0; i < expected.size(); ++i) ASSERT_EQ(pr.x[i], float(expected[i])) << i;
  }
}

TEST(ScanCpu, BlocksMatchTheSameMatrixScannedDense) {
  // H blocks of size k, and the block-diagonal matrix of size H·k scanned as one dense block.
  std::mt19937 rng(8);
  for (int64_t k = 1; k <= 8; ++k) {
    const int64_t H = 3, Tn = 200;
    Problem<double> blocks(2, Tn, H, k);
    fill_random(blocks, rng, 1.5);
    Problem<double> dense(2, Tn, 1, H * k);
    std::fill(dense.A.begin(), dense.A.end(), 0.0);
    const int64_t n = H * k;
    for (int64_t bt = 0; bt < 2 * Tn; ++bt) {
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < k; ++i) {
          for (int64_t j = 0; j < k; ++j) {
            dense.A[bt * n * n + (h * k + i) * n + h * k + j] = blocks.A[((bt * H + h) * k + i) * k + j];
          }
        }
      }
    }
    dense.b = blocks.b;
    dense.x0 = blocks.x0;
    for (int flags = 0; flags < 4; ++flags) {
      scan_cpu(blocks.params(flags & 1, flags & 2, false, true), DType::f64, CpuSchedule{2, 1}, serial_for);
      scan_cpu(dense.params(flags & 1, flags & 2, false, true), DType::f64, CpuSchedule{1, 3}, serial_for);
      for (size_t i = 0; i < blocks.x.size(); ++i) ASSERT_NEAR(blocks.x[i], dense.x[i], 1e-12) << "k=" << k;
    }
  }
}

TEST(ScanCpu, StridedTimeFirstViewNeedsNoCopy) {
  // Storage [T, B, H] read through strides as [B, T, H]: same answer as the contiguous copy.
  std::mt19937 rng(9);
  const int64_t B = 3, Tn = 257, H = 5;
  Problem<double> pr(B, Tn, H, 1);
  fill_random(pr, rng, 1.9);
  std::vector<double> a_tf(Tn * B * H), b_tf(Tn * B * H), x_tf(Tn * B * H);
  for (int64_t bi = 0; bi < B; ++bi) {
    for (int64_t t = 0; t < Tn; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        a_tf[(t * B + bi) * H + h] = pr.A[(bi * Tn + t) * H + h];
        b_tf[(t * B + bi) * H + h] = pr.b[(bi * Tn + t) * H + h];
      }
    }
  }
  ScanParams p = pr.params(false, false, false, true);
  const auto expected = pr.reference(p);
  p.A = a_tf.data();
  p.b = b_tf.data();
  p.x = x_tf.data();
  const int64_t A_s[5] = {H, B * H, 1, 1, 1}, v_s[4] = {H, B * H, 1, 1};
  std::copy(A_s, A_s + 5, p.A_stride);
  std::copy(v_s, v_s + 4, p.b_stride);
  std::copy(v_s, v_s + 4, p.x_stride);
  scan_cpu(p, DType::f64, CpuSchedule{2, 3}, serial_for);
  for (int64_t bi = 0; bi < B; ++bi) {
    for (int64_t t = 0; t < Tn; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        ASSERT_NEAR(x_tf[(t * B + bi) * H + h], expected[(bi * Tn + t) * H + h], 1e-12);
      }
    }
  }
}

}  // namespace
}  // namespace pnewton
