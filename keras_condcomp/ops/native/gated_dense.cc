// TensorFlow ops for GatedDense (and Dense) at inference, which compute only
// the active blocks and read only the kernel rows of non-zero inputs.
//
//   KerasCondcompGatedDense(inputs, policy_kernel, policy_bias, block_kernel, bias)
//     the layer's threshold policy and its products in one op: block b of
//     example e runs when (inputs[e] @ policy_kernel + policy_bias)[b] > 0;
//   KerasCondcompBlockSparseDense(inputs, block_kernel, bias, block_mask)
//     the products of the blocks where block_mask[e, b] != 0;
//   KerasCondcompDense(inputs, kernel, bias)
//     a Dense layer's product, reading the rows of non-zero inputs only;
//   KerasCondcompChain(inputs, weights)
//     layers of those two kinds one after the other, each reading its
//     weights from tensors or from the layers' variables (their handles):
//     called eagerly, one op for a model's chain instead of one per layer
//     (about 50 us each after a call of another model, which left the
//     runtime's own data out of the caches) and of one read op per weight.
//
// An active block's output is activation(inputs[e] @ block_kernel[b] + bias[b]),
// every other block's is 0 (activation: "linear" or "relu").
//
// Built by keras_condcomp/ops/native_kernels.py against the installed
// TensorFlow on first use. Called eagerly, an op costs 10-50 us, where
// calling a graph costs about 0.2 ms (the guide "How skipping runs fast").

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/blocking_counter.h"
#include "tensorflow/core/platform/threadpool.h"

namespace keras_condcomp {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::DT_RESOURCE;
using ::tensorflow::Var;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
namespace shape_inference = ::tensorflow::shape_inference;

// Examples multiplied together in one pass over a block's rows, at most:
// with dense inputs, as many as keep their sums in 24 of AVX-512's 32
// registers (the row and the input take the rest) for the block or for
// its pieces of 64 units, twelve at most (12 up to 16 and at 32 units, 8
// at 24 and 48, 6 at 64 and wider); else four.
// Six against four, and against Eigen's product from eight examples on:
// the Bengio MLP's first layer at density 3/4, batch 256, one thread, in
// 16.3 ms against 18.7 and 24.0 ms. More than six where the sums allow,
// one thread, A/B both ways round at batches 50 and 256: twelve at 16
// units 5-11% faster (784 -> 256 in 16 blocks, densities 1/4 to 1), at 32
// units 3-8%, eight at 48 units 3-5%, at 24 units 0-3%. Sparse inputs,
// four: a tile reads the union of its examples' rows, each multiplied for
// every example (six: the second layer 5-9% slower).
//
// Without AVX-512 (AVX2: 16 registers of 8 floats) the sums get 12
// registers, and a tile whose sums do not fit them multiplies its block a
// cache line of columns (16 units) at a time: each line of the kernel is
// still read once a tile.
//
// Blocks wider than 64 units had tiles of four until session 43; six, as
// at 64, on dense inputs, AVX2, one thread, batches 50 and 256, densities
// 1 to 1/8, A/B in one process: 1024 -> 8 x 128 1.01x-1.10x -> 1.51x-1.57x
// of `x @ kernel` at density 1, 3072 -> 12 x 128 0.72x-0.75x -> 1.08x-1.09x,
// 1536 -> 16 x 96 0.72x-0.83x -> 1.04x-1.22x, 1024 -> 4 x 256 0.80x-0.82x
// -> 1.04x-1.26x (at 1/8 +1% to +39%; two threads, density 1, +27% to
// +45%). (Tried in session 39 on the demo's MLP, whose 128-unit
// blocks read 64 inputs or sparse ones: the same.)
constexpr int kMostTile = 12;
constexpr int kSparseTile = 4;
#if defined(__AVX512F__)
constexpr int kVectorLanes = 16;
constexpr int kSumRegisters = 24;
constexpr int kWidestPass = 64;
#else
constexpr int kVectorLanes = 8;
constexpr int kSumRegisters = 12;
constexpr int kWidestPass = 16;
#endif

// The vectors of one example's sums in Product's kernel for `width`: for
// the widths with a kernel of their own, of kVectorLanes lanes where the
// width is a multiple of them, else of 8; for the others, vectors of 16
// (masked) with AVX-512, else one sum per unit.
int SumVectors(int width) {
  switch (width) {
    case 8: case 16: case 24: case 32: case 48: case 64: case 96: case 128:
      return width % kVectorLanes == 0 ? width / kVectorLanes : width / 8;
  }
#if defined(__AVX512F__)
  return (width + 15) / 16;
#else
  return std::max(1, width / 8);  // Product's vectors of 8, the rest summed in memory
#endif
}
int TileCap(int width, bool dense) {
  if (!dense) return kSparseTile;
  return std::min(kMostTile, kSumRegisters / SumVectors(std::min(width, kWidestPass)));
}

// Rows read ahead of the one multiplied.
constexpr int kAhead = 16;
// Bytes read ahead into the outer caches, on top, where a block's rows are
// contiguous: two blocks of 3072 x 64 read in a standalone loop, one
// thread, at 21 GB/s against 15 GB/s (16 KB or 96 KB ahead: 16-17 GB/s);
// the op's products of two such blocks at batch 1 in 100 us against 118 us.
constexpr int64_t kFarBytes = 64 * 1024;
// Bytes of a block's rows multiplied for all its tiles of dense inputs
// before its next rows, where it has more than one such tile: each row is
// read from memory once, then from the core's own cache (a Zen 3 core's L2
// holds 512 KB, a block of 3072 x 64 units 768 KB). One tile after another
// over all the rows, the Bengio MLP's first layer, density 3/4, on a
// 2-core AMD EPYC (AVX2), one thread: 1.30x-1.36x of Dense at batch 50,
// 1.45x-1.49x at 256; in chunks of 128 KB 1.56x-1.57x, 1.67x-1.69x (256
// KB the same; 64 KB 1.51x, 1.65x; 32 KB 1.40x, 1.52x). Two threads,
// density 1, batch 256: 0.89x -> 0.99x. Blocks that fit the cache: the
// same within the noise.
constexpr int kChunkBytes = 128 * 1024;
// Multiply-adds of a call from which its blocks are shared among threads.
constexpr int64_t kShardMinMacs = int64_t{1} << 22;
// Examples a thread takes at a time before the products (their non-zero
// inputs, then the policy's logits) where those are shared among threads:
// chunks of 11 or 12, whose tiles hold at least three examples and so sum
// their rows in one order, the logits those of the whole batch in one.
constexpr int64_t kChunkExamples = 12;

// Calls work(i) for every item i in [0, items), shared among TensorFlow's
// intra-op threads while the calling thread waits. The items are split
// into one run of consecutive items a thread: each thread woken takes the
// items of its own run in turn, then what is left of the others' (a
// thread slow to wake takes fewer).
//
// Before session 48 the policy's chunks were taken in turn by the calling
// thread and helpers, and the products shared by TensorFlow's Shard. Against
// that, two threads, 2-core AMD EPYC Zen 4, the op before and after built
// side by side, each call after one of Dense (guide "How skipping runs
// fast"): 784 -> 16 x 16 at 3/4 0.88x-0.96x of the time at batch 50, 1.00x
// at 256; the Bengio MLP's first layer at 1/16, batch 256, 0.93x-0.95x
// (batches 1 and 50, and 3/4, 0.97x-0.99x), its second (inputs 1/16
// non-zero) 0.96x at 256 and 1.01x at 50; 1024 -> 16 x 64 at 1/4 0.94x-0.95x.
// At 784 -> 16 x 16, batch 256, items taken one at a time from the start
// instead of in runs took 1.13x-1.40x the time (timed right after the op
// before them, which favours them); runs chosen by the CPU a thread is on
// (the same blocks on a core from call to call) ran as these. The calling
// thread taking a run itself, one thread fewer woken, took 1.06x / 1.02x
// the time at batches 50 / 256, and 1.20x / 1.04x spinning at the end
// instead of sleeping (session 49, each variant after a Dense call, order
// reversed every round; a thread woken onto the caller's core, as in 29%
// of calls at batch 50, shares it with a working caller).
template <typename Work>
void ShareAmongThreads(OpKernelContext* context, int64_t items, Work&& work) {
  auto* workers = context->device()->tensorflow_cpu_worker_threads();
  const int threads = static_cast<int>(std::min<int64_t>(workers->num_threads, items));
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) work(i);
    return;
  }
  std::vector<std::atomic<int64_t>> next(threads);
  for (int run = 0; run < threads; ++run) next[run].store(items * run / threads);
  auto take = [&](int first_run) {
    for (int r = 0; r < threads; ++r) {
      const int run = (first_run + r) % threads;
      const int64_t end = items * (run + 1) / threads;
      for (int64_t i = next[run].fetch_add(1); i < end; i = next[run].fetch_add(1)) work(i);
    }
  };
  // The threads are woken as a tree, as Eigen's parallelFor wakes them:
  // the threads of [first, last) are woken by first's, which wakes those of
  // the upper half and halves again, so that the last of many cores is not
  // woken after all the others (untimed: only 2-core machines so far; with
  // two threads the calling thread wakes both, as before).
  ::tensorflow::BlockingCounter done(threads);
  std::function<void(int, int)> wake_and_take;  // threads [first, last)
  auto wake_upper_halves = [&](int first, int last) {
    while (last - first > 1) {
      const int middle = first + (last - first) / 2;
      workers->workers->Schedule([&wake_and_take, &done, middle, last] {
        wake_and_take(middle, last);
        done.DecrementCount();
      });
      last = middle;
    }
  };
  wake_and_take = [&](int first, int last) {
    wake_upper_halves(first, last);
    take(first);
  };
  wake_upper_halves(0, threads);
  workers->workers->Schedule([&take, &done] {
    take(0);
    done.DecrementCount();
  });
  done.Wait();
}

// Calls work(first, last) for examples [first, last) covering the `batch`:
// where `macs` (the work's multiply-adds) reach kShardMinMacs and there
// are several intra-op threads, for chunks of about kChunkExamples
// (ShareAmongThreads); else once for the whole batch on the calling
// thread. (In chunks on one thread too, the Bengio MLP at 1/16, batch 256,
// ran at 0.91x-1.08x of the op before, typically 0.97x, in eleven paired
// runs; likely the policy's kernel, 295 KB, leaving the core's cache
// between a chunk's scan and its logits.)
//
// The GatedDense op's policy, shared so against its logits over the whole
// batch on the calling thread (two threads, 2-core AMD EPYC with AVX2, the
// op before and after built side by side, each timed against Dense alone):
// the Bengio MLP's first layer at density 1/16, batch 256 (19M
// multiply-adds), 3.17x-3.85x of Dense -> 3.26x-5.08x (twelve runs); batch
// 50 (3.7M, not shared) the same. Shared where the layer's dense product
// reached the bar instead of the policy's, 784 -> 16 x 16 at batch 50
// (0.6M) 1.09x-1.14x -> 0.93x-1.05x: waking a thread cost more.
template <typename Work>
void ForChunks(OpKernelContext* context, int64_t batch, int64_t macs, Work&& work) {
  const int64_t chunks = std::max<int64_t>(1, (batch + kChunkExamples - 1) / kChunkExamples);
  if (macs < kShardMinMacs ||
      context->device()->tensorflow_cpu_worker_threads()->num_threads <= 1) {
    work(0, batch);
    return;
  }
  ShareAmongThreads(context, chunks, [&](int64_t c) {
    work(batch * c / chunks, batch * (c + 1) / chunks);
  });
}

// A tile of several examples reads every row of its block where the union
// of their non-zero rows is at least kEveryRowNum / kEveryRowDen of them;
// a block's examples are tiled as dense inputs (TileCap) where at least
// half of them have kDenseTileNum / kDenseTileDen of their inputs non-zero.
// Sparse tiles read their rows through a list, four examples at most;
// dense tiles read them in order, up to twelve (on AVX2 six from 16 units).
// Before, both bars were the one of batch 1 (half the inputs non-zero; an
// example alone reads its own rows), so ReLU outputs 45% non-zero ran in
// sparse tiles of four over 90% of the rows. A/B in one process, calls in
// random order, one thread, 2-core AMD EPYC (AVX2), inputs non-zero at
// random, batches 50 and 256, densities 1 and 3/4 (1/4): at 30-45%
// non-zero, 1536 -> 24 x 64 0.80x-1.30x of Dense -> 0.98x-1.63x (2.34x-2.87x
// -> 2.76x-4.01x), 784 -> 16 x 16 0.46x-0.96x -> 0.79x-1.34x; at 20%,
// 784 -> 16 x 16, batch 256, d = 1: 0.79x -> 1.05x; at 5-15% and 55% the
// same within the noise. A union bar of a half: 1536 -> 24 x 64 at 20%,
// batch 256, d = 1, 1.26x -> 0.79x; bars of 3/4 and 1/4: 784 -> 16 x 16 at
// 20% stayed at 0.79x.
constexpr int kEveryRowNum = 2;
constexpr int kEveryRowDen = 3;
constexpr int kDenseTileNum = 1;
constexpr int kDenseTileDen = 5;

// The non-zero entries of one example's inputs: a bit each (`bits`), and
// listed (`rows`) where fewer than half of them are (else `all`: the
// products read every row). `dense_tiled`: the example counts as dense
// inputs in tiles of several (kDenseTileNum / kDenseTileDen).
struct Nonzeros {
  std::vector<uint64_t> bits;
  std::vector<int> rows;
  bool all = false;
  bool dense_tiled = false;
};

// Bit k of the result: p[k] != 0 (NaN included), for k < n <= 64.
inline uint64_t NonzeroBits(const float* p, int n) {
  uint64_t bits = 0;
  int k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= n; k += 16) {
    const uint64_t lanes = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + k), _mm512_setzero_ps(),
                                              _CMP_NEQ_UQ);
    bits |= lanes << k;
  }
#elif defined(__AVX__)
  for (; k + 8 <= n; k += 8) {
    const uint64_t lanes = static_cast<uint32_t>(_mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_loadu_ps(p + k), _mm256_setzero_ps(), _CMP_NEQ_UQ)));
    bits |= lanes << k;
  }
#endif
  for (; k < n; ++k) bits |= static_cast<uint64_t>(p[k] != 0.0f) << k;
  return bits;
}

// The rows whose bits are set in `bits` (words of 64), in order, into `rows`.
void ListBits(const uint64_t* bits, int words, std::vector<int>* rows) {
  for (int w = 0; w < words; ++w) {
    for (uint64_t word = bits[w]; word != 0; word &= word - 1) {
      rows->push_back(w * 64 + __builtin_ctzll(word));
    }
  }
}

int Words(int input_dim) { return (input_dim + 63) / 64; }

// No branch per input: a loop with one cost more than the products of a
// sparse layer (the Bengio MLP's second layer at density 1/16, batch 50:
// 0.46 ms, against 0.30 ms with the bits and the lists made from them).
// Of examples [first, last), into `nonzeros` (batch).
void FindNonzeros(const float* x, int64_t first, int64_t last, int input_dim,
                  std::vector<Nonzeros>* nonzeros) {
  const int words = Words(input_dim);
  for (int64_t e = first; e < last; ++e) {
    const float* xe = x + e * input_dim;
    Nonzeros& nz = (*nonzeros)[e];
    nz.bits.resize(words);
    int count = 0;
    for (int w = 0; w < words; ++w) {
      nz.bits[w] = NonzeroBits(xe + w * 64, std::min(64, input_dim - w * 64));
      count += __builtin_popcountll(nz.bits[w]);
    }
    nz.all = 2 * count >= input_dim;
    nz.dense_tiled = kDenseTileDen * count >= kDenseTileNum * input_dim;
    if (!nz.all) {
      nz.rows.reserve(count);
      ListBits(nz.bits.data(), words, &nz.rows);
    }
  }
}

std::vector<Nonzeros> FindNonzeros(const float* x, int64_t batch, int input_dim) {
  std::vector<Nonzeros> nonzeros(batch);
  FindNonzeros(x, 0, batch, input_dim, &nonzeros);
  return nonzeros;
}

// Vectors of 16 or 8 floats (GCC's and Clang's vector extension), so that
// the sums of a row are vectors whatever the compiler makes of the loops:
// left to itself, GCC 12 vectorised 16-wide blocks across rows, with
// shuffles (4.7x slower). 16 lanes where the width allows, so that a tile
// of four examples of 64 units keeps its 16 sums in AVX-512's registers
// (8 lanes spilled them: 25% slower at batch 50).
using Vector16 = float __attribute__((vector_size(64)));
using Vector8 = float __attribute__((vector_size(32)));

// A vector read from any float's address (a row need not start on a
// vector's alignment): the unaligned load of the CPU's instructions where
// the compiler targets them (a copy through memory was 20-40% slower at
// batch 1), else a copy.
template <typename Vector>
inline Vector Load(const float* p) {
#if defined(__AVX512F__)
  if constexpr (sizeof(Vector) == 64) return reinterpret_cast<Vector>(_mm512_loadu_ps(p));
#endif
#if defined(__AVX__)
  if constexpr (sizeof(Vector) == 32) return reinterpret_cast<Vector>(_mm256_loadu_ps(p));
#endif
  Vector v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc[t][j] += x_t[r] * kernel[r * stride + j] (j < width) over `rows`
// (every row when null), for the T examples of a tile. W > 0 is the width,
// a multiple of 8 known at compile time, so that the sums stay in
// registers; U rows at a time go to U separate sums (up to four, as the
// registers allow), so that consecutive rows do not wait on each other
// (twice the memory throughput at batch 1, measured). W = 0: any width,
// one row at a time, the sums in memory.
template <int W, int T>
void TileProduct(const float* const* x, const float* kernel, int64_t stride, int width,
                 const int* rows, int row_count, float* acc) {
  if (W == 0) {
    for (int i = 0; i < row_count; ++i) {
      const int r = rows == nullptr ? i : rows[i];
      const float* k = kernel + r * stride;
      for (int t = 0; t < T; ++t) {
        const float v = x[t][r];
        float* s = acc + t * width;
        for (int j = 0; j < width; ++j) s[j] += v * k[j];
      }
    }
    return;
  }
  using Vector = std::conditional_t<W % 16 == 0 && kVectorLanes == 16, Vector16, Vector8>;
  constexpr int kLanes = sizeof(Vector) / sizeof(float);
  constexpr int C = W > 0 ? W / kLanes : 1;
  constexpr int U = std::max(1, std::min(T >= 4 ? 1 : 4 / T, kSumRegisters / (T * C)));
  Vector sums[U][T][C] = {};
  auto add_row = [&](int u, int r, auto row_stride) {
    const float* row = kernel + r * row_stride;
    Vector k[C];
    for (int c = 0; c < C; ++c) k[c] = Load<Vector>(row + c * kLanes);
    for (int t = 0; t < T; ++t) {
      const float v = x[t][r];
      for (int c = 0; c < C; ++c) sums[u][t][c] += v * k[c];
    }
  };
  int i = 0;
  // Every row in order: the rows kAhead and `far` on asked for now
  // (prefetching is harmless past the end): 8-10% more memory throughput,
  // one thread.
  auto every_row = [&](auto row_stride) {
    const int far = static_cast<int>(std::max<int64_t>(
        kAhead, kFarBytes / (row_stride * static_cast<int64_t>(sizeof(float)))));
    for (; i + U <= row_count; i += U) {
      for (int u = 0; u < U; ++u) {
        const float* ahead = kernel + (i + u + kAhead) * row_stride;
        for (int line = 0; line < W; line += 16) __builtin_prefetch(ahead + line);
        const float* further = kernel + (i + u + far) * row_stride;
        for (int line = 0; line < W; line += 16) __builtin_prefetch(further + line, 0, 1);
        add_row(u, i + u, row_stride);
      }
    }
    for (; i < row_count; ++i) add_row(0, i, row_stride);
  };
  if (rows == nullptr && stride == W) {
    // A block's own rows, contiguous: with the stride known, the loop keeps
    // its pointers in registers (GCC 12 moved them through vector registers
    // at every row). With the far rows' bound check gone too, 784 -> 16 x
    // 16 at density 3/4, AVX-512 on a 2-core AMD EPYC (Zen 4), the op
    // before and after side by side, each against Dense: 0.82x -> 1.02x at
    // batch 256 on one thread, 0.78x -> 0.92x-0.96x on two; 3072 -> 24 x
    // 64 at 3/4, batch 50, 1.21x -> 1.30x (session 47; built for AVX2 there,
    // level or ahead).
    every_row(std::integral_constant<int64_t, W>());
  } else if (rows == nullptr) {
    every_row(stride);
  } else {
    for (; i + U <= row_count; i += U) {
      for (int u = 0; u < U; ++u) {
        if (i + u + kAhead < row_count) {
          const float* ahead = kernel + rows[i + u + kAhead] * stride;
          for (int line = 0; line < W; line += 16) __builtin_prefetch(ahead + line);
        }
        add_row(u, rows[i + u], stride);
      }
    }
    for (; i < row_count; ++i) add_row(0, rows[i], stride);
  }
  for (int t = 0; t < T; ++t) {
    for (int u = 1; u < U; ++u) {
      for (int c = 0; c < C; ++c) sums[0][t][c] += sums[u][t][c];
    }
    float total[C * kLanes];
    std::memcpy(total, sums[0][t], sizeof total);
    for (int j = 0; j < C * kLanes; ++j) acc[t * W + j] += total[j];
  }
}

#if defined(__AVX512F__)
// TileProduct for any width up to 64, in C vectors of 16 whose lanes past
// `width` are neither read nor written (masked), where the other widths'
// loop is scalar: the products of a Dense head of 10 units on the Bengio
// MLP's sparse features at density 1/16, batch 50, in 11 us against 34 us.
// The tile's sums are added to `acc` in loops unrolled at compile time, and
// the rows run in one loop for each kind (every row, or through a list)
// with the tile's examples unrolled: until session 47 a loop over the last
// vector's lanes, a count known only at run time, made GCC 12 keep every
// sum in memory, loaded and stored at each row, and with that loop alone
// changed, tiles of one vector (up to 16 units) still did (a C++ harness,
// one thread, Zen 4, 256 x 1536 inputs, every row: 10, 20 and 40 units
// 2.4x-2.6x faster, tiles of three 10 units 3.8x).
template <int C, int T>
void MaskedTileProduct(const float* const* x, const float* kernel, int64_t stride, int width,
                       const int* rows, int row_count, float* acc) {
  const __mmask16 last = static_cast<__mmask16>((1u << (width - 16 * (C - 1))) - 1);
  __m512 sums[T][C];
  for (int t = 0; t < T; ++t) {
    for (int c = 0; c < C; ++c) sums[t][c] = _mm512_setzero_ps();
  }
  auto add_row = [&](const float* row, int r) {
    __m512 k[C];
    for (int c = 0; c + 1 < C; ++c) k[c] = _mm512_loadu_ps(row + 16 * c);
    k[C - 1] = _mm512_maskz_loadu_ps(last, row + 16 * (C - 1));
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512 v = _mm512_set1_ps(x[t][r]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) sums[t][c] = _mm512_fmadd_ps(v, k[c], sums[t][c]);
    }
  };
  if (rows == nullptr) {
    for (int i = 0; i < row_count; ++i) {
      const float* row = kernel + i * stride;
      for (int c = 0; c < C; ++c) __builtin_prefetch(row + kAhead * stride + 16 * c);
      add_row(row, i);
    }
  } else {
    for (int i = 0; i < row_count; ++i) {
      if (i + kAhead < row_count) {
        const float* ahead = kernel + rows[i + kAhead] * stride;
        for (int c = 0; c < C; ++c) __builtin_prefetch(ahead + 16 * c);
      }
      add_row(kernel + rows[i] * stride, rows[i]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __mmask16 lanes = c + 1 < C ? static_cast<__mmask16>(0xffff) : last;
      float* out = acc + t * width + 16 * c;
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, out),
                                       sums[t][c]);
      _mm512_mask_storeu_ps(out, lanes, sum);
    }
  }
}

template <int C>
struct MaskedTiles {
  template <int T>
  static void Run(const float* const* x, const float* kernel, int64_t stride, int width,
                  const int* rows, int row_count, float* acc) {
    MaskedTileProduct<C, T>(x, kernel, stride, width, rows, row_count, acc);
  }
};
#endif

template <int W>
struct Tiles {
  template <int T>
  static void Run(const float* const* x, const float* kernel, int64_t stride, int width,
                  const int* rows, int row_count, float* acc) {
    TileProduct<W, T>(x, kernel, stride, width, rows, row_count, acc);
  }
};

// Kernel::Run<T> for the tile size T = `tile` (1 to kMostTile), known at
// compile time so that the tile's sums stay in registers.
template <typename Kernel>
void OfTile(int tile, const float* const* x, const float* kernel, int64_t stride, int width,
            const int* rows, int row_count, float* acc) {
  static_assert(kMostTile == 12, "a case for every tile size");
  switch (tile) {
    case 12: Kernel::template Run<12>(x, kernel, stride, width, rows, row_count, acc); break;
    case 11: Kernel::template Run<11>(x, kernel, stride, width, rows, row_count, acc); break;
    case 10: Kernel::template Run<10>(x, kernel, stride, width, rows, row_count, acc); break;
    case 9: Kernel::template Run<9>(x, kernel, stride, width, rows, row_count, acc); break;
    case 8: Kernel::template Run<8>(x, kernel, stride, width, rows, row_count, acc); break;
    case 7: Kernel::template Run<7>(x, kernel, stride, width, rows, row_count, acc); break;
    case 6: Kernel::template Run<6>(x, kernel, stride, width, rows, row_count, acc); break;
    case 5: Kernel::template Run<5>(x, kernel, stride, width, rows, row_count, acc); break;
    case 4: Kernel::template Run<4>(x, kernel, stride, width, rows, row_count, acc); break;
    case 3: Kernel::template Run<3>(x, kernel, stride, width, rows, row_count, acc); break;
    case 2: Kernel::template Run<2>(x, kernel, stride, width, rows, row_count, acc); break;
    default: Kernel::template Run<1>(x, kernel, stride, width, rows, row_count, acc); break;
  }
}

// acc (tile x width) += the tile's products over `rows`: in one pass where
// the tile's sums fit the registers, else in pieces of columns that fit
// (the widest of 64, 48, 32, 16 and 8 units; a rest narrower than 8
// summed in memory). Without AVX-512, the Bengio MLP's blocks of 64 units
// in one pass, tiles of six examples, kept 48 sums in 16 registers: 10x
// slower than Keras's Dense at batch 50 and density 3/4.
void Product(int tile, const float* const* x, const float* kernel, int64_t stride, int width,
             const int* rows, int row_count, float* acc) {
#define KERAS_CONDCOMP_CASE(N, Kernel)                                    \
  case N:                                                                 \
    OfTile<Kernel>(tile, x, kernel, stride, width, rows, row_count, acc); \
    return;
  if (tile * SumVectors(width) <= kSumRegisters) {
    switch (width) {
      KERAS_CONDCOMP_CASE(8, Tiles<8>)
      KERAS_CONDCOMP_CASE(16, Tiles<16>)
      KERAS_CONDCOMP_CASE(24, Tiles<24>)
      KERAS_CONDCOMP_CASE(32, Tiles<32>)
      KERAS_CONDCOMP_CASE(48, Tiles<48>)
      KERAS_CONDCOMP_CASE(64, Tiles<64>)
      KERAS_CONDCOMP_CASE(96, Tiles<96>)
      KERAS_CONDCOMP_CASE(128, Tiles<128>)
    }
#if defined(__AVX512F__)
    switch ((width + 15) / 16) {  // vectors of 16
      KERAS_CONDCOMP_CASE(1, MaskedTiles<1>)
      KERAS_CONDCOMP_CASE(2, MaskedTiles<2>)
      KERAS_CONDCOMP_CASE(3, MaskedTiles<3>)
      KERAS_CONDCOMP_CASE(4, MaskedTiles<4>)
    }
#endif
  }
#undef KERAS_CONDCOMP_CASE
  int piece = 0;
  for (int candidate : {64, 48, 32, 16, 8}) {
    if (candidate < width && tile * SumVectors(candidate) <= kSumRegisters) {
      piece = candidate;
      break;
    }
  }
  if (piece == 0) {
    OfTile<Tiles<0>>(tile, x, kernel, stride, width, rows, row_count, acc);
    return;
  }
  float sums[kMostTile * 64];
  for (int start = 0; start < width; start += piece) {
    const int columns = std::min(piece, width - start);
    std::fill(sums, sums + tile * columns, 0.0f);
    Product(tile, x, kernel + start, stride, columns, rows, row_count, sums);
    for (int t = 0; t < tile; ++t) {
      for (int j = 0; j < columns; ++j) acc[t * width + start + j] += sums[t * columns + j];
    }
  }
}

// Per-thread buffers of the tiles.
struct Scratch {
  explicit Scratch(int input_dim) : bits(Words(input_dim)) {}
  std::vector<uint64_t> bits;
  std::vector<int> rows;
};

// Calls run(start, tile) for the tiles of the n examples `members`: as
// few as the widest tile for `width` allows, of sizes as even as can be.
template <typename Run>
void ForEachTile(const int* members, int n, const std::vector<Nonzeros>& nonzeros, int width,
                 Run&& run) {
  int dense = 0;
  for (int i = 0; i < n; ++i) dense += nonzeros[members[i]].dense_tiled;
  const int most = TileCap(width, 2 * dense >= n);
  const int passes = (n + most - 1) / most;
  for (int pass = 0, start = 0; pass < passes; ++pass) {
    const int tile = (n - start) / (passes - pass);
    run(start, tile);
    start += tile;
  }
}

// Whether a tile's product reads every row: some example's inputs are
// mostly non-zero, or the tile has several examples and the union of their
// non-zero rows, left in scratch->bits, is most of them (kEveryRowNum /
// kEveryRowDen).
bool ReadsEveryRow(const int* members, int tile, const std::vector<Nonzeros>& nonzeros,
                   int input_dim, Scratch* scratch) {
  for (int t = 0; t < tile; ++t) {
    if (nonzeros[members[t]].all) return true;
  }
  if (tile == 1) return false;
  std::vector<uint64_t>& bits = scratch->bits;
  const int words = static_cast<int>(bits.size());
  std::copy(nonzeros[members[0]].bits.begin(), nonzeros[members[0]].bits.end(), bits.begin());
  for (int t = 1; t < tile; ++t) {
    const uint64_t* own = nonzeros[members[t]].bits.data();
    for (int w = 0; w < words; ++w) bits[w] |= own[w];
  }
  int count = 0;
  for (int w = 0; w < words; ++w) count += __builtin_popcountll(bits[w]);
  return kEveryRowDen * count >= kEveryRowNum * input_dim;
}

// The addresses of the `tile` examples `members`' inputs.
void TileInputs(const int* members, int tile, const float* x, int input_dim,
                const float** tile_x) {
  for (int t = 0; t < tile; ++t) tile_x[t] = x + static_cast<int64_t>(members[t]) * input_dim;
}

// acc (tile x width) = the inputs of the `tile` examples `members` times the
// (input_dim x width) kernel at `kernel` (rows `stride` apart): over every
// row where `every_row` (ReadsEveryRow's answer), else over the rows some of
// them use: one example's own, or the union ReadsEveryRow left in
// scratch->bits.
void TileRun(const int* members, int tile, const float* x, int input_dim,
             const std::vector<Nonzeros>& nonzeros, const float* kernel, int64_t stride,
             int width, bool every_row, Scratch* scratch, float* acc) {
  std::fill(acc, acc + tile * width, 0.0f);
  const float* tile_x[kMostTile];
  TileInputs(members, tile, x, input_dim, tile_x);
  if (every_row) {
    Product(tile, tile_x, kernel, stride, width, nullptr, input_dim, acc);
    return;
  }
  const std::vector<int>* rows = &nonzeros[members[0]].rows;
  if (tile > 1) {
    scratch->rows.clear();
    ListBits(scratch->bits.data(), static_cast<int>(scratch->bits.size()), &scratch->rows);
    rows = &scratch->rows;
  }
  Product(tile, tile_x, kernel, stride, width, rows->data(), static_cast<int>(rows->size()), acc);
}

// Computes the blocks of `outputs` (batch x units) that `examples_of` lists
// (for each block, its active examples), leaving the others as they are.
// Block j's weights are the (input_dim x block_size) matrix at `kernel +
// j * block_offset`, rows `stride` apart. The blocks are shared among
// TensorFlow's intra-op threads.
class BlockProducts {
 public:
  BlockProducts(const float* x, int input_dim,
                const std::vector<Nonzeros>& nonzeros, const float* kernel,
                int64_t block_offset, int64_t stride, int block_size, const float* bias,
                bool relu)
      : x_(x), input_dim_(input_dim), nonzeros_(nonzeros), kernel_(kernel),
        block_offset_(block_offset), stride_(stride), block_size_(block_size), bias_(bias),
        relu_(relu) {}

  void Run(OpKernelContext* context, const std::vector<std::vector<int>>& examples_of,
           float* outputs, int units) const {
    std::vector<int64_t> active;  // the blocks some example runs
    for (int64_t j = 0; j < static_cast<int64_t>(examples_of.size()); ++j) {
      if (!examples_of[j].empty()) active.push_back(j);
    }
    if (active.empty()) return;
    auto work = [&](int64_t first, int64_t last) {
      Scratch scratch(input_dim_);
      std::vector<float> acc;
      std::vector<std::pair<int, int>> dense_tiles;  // (start, size)
      for (int64_t a = first; a < last; ++a) {
        const int64_t j = active[a];
        const std::vector<int>& members = examples_of[j];
        const int n = static_cast<int>(members.size());
        const float* kernel = kernel_ + j * block_offset_;
        const float* bias = bias_ == nullptr ? nullptr : bias_ + j * block_size_;
        float* out = outputs + j * block_size_;
        acc.resize(static_cast<size_t>(n) * block_size_);
        auto write = [&](int start, int tile) {
          for (int t = 0; t < tile; ++t) {
            Write(acc.data() + (start + t) * block_size_, bias,
                  out + static_cast<int64_t>(members[start + t]) * units);
          }
        };
        dense_tiles.clear();
        ForEachTile(members.data(), n, nonzeros_, block_size_, [&](int start, int tile) {
          if (ReadsEveryRow(members.data() + start, tile, nonzeros_, input_dim_, &scratch)) {
            dense_tiles.emplace_back(start, tile);
            return;
          }
          TileRun(members.data() + start, tile, x_, input_dim_, nonzeros_, kernel, stride_,
                  block_size_, false, &scratch, acc.data() + start * block_size_);
          write(start, tile);
        });
        DenseTileProducts(members.data(), dense_tiles, kernel, acc.data());
        for (const auto& [start, tile] : dense_tiles) write(start, tile);
      }
    };
    // Shared among the threads only when there is enough work: waking a
    // thread cost more than the products at batch 1 (Bengio MLP, density
    // 1/16, two threads: 3.0x of Dense against 6.0x on one thread).
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    if (workers->num_threads <= 1 || MostMacs(examples_of) < kShardMinMacs) {
      work(0, static_cast<int64_t>(active.size()));
      return;
    }
    ShareAmongThreads(context, static_cast<int64_t>(active.size()),
                      [&](int64_t a) { work(a, a + 1); });
  }

 private:
  // The multiply-adds of the products at most: over the tiles, the rows
  // their examples read (the union of a tile's non-zero rows has at most
  // the sum of theirs) x examples x units. Counting every row of sparse
  // inputs, the Bengio MLP's second layer at 1/16, batch 50, two threads,
  // was shared and took 147 us against 74 us on one thread.
  int64_t MostMacs(const std::vector<std::vector<int>>& examples_of) const {
    int64_t macs = 0;
    for (const std::vector<int>& members : examples_of) {
      ForEachTile(members.data(), static_cast<int>(members.size()), nonzeros_, block_size_,
                  [&](int start, int tile) {
        int64_t rows = 0;
        for (int t = 0; t < tile; ++t) {
          const Nonzeros& nz = nonzeros_[members[start + t]];
          rows += nz.all ? input_dim_ : static_cast<int64_t>(nz.rows.size());
        }
        macs += std::min<int64_t>(rows, input_dim_) * tile * block_size_;
      });
    }
    return macs;
  }

  // acc (members x block_size, rows as `members`) = the products of the
  // tiles `dense_tiles` (start, size) of dense inputs with the block at
  // `kernel`: where there are several, row by row, a chunk of rows
  // (kChunkBytes) for every tile before the next chunk.
  void DenseTileProducts(const int* members, const std::vector<std::pair<int, int>>& dense_tiles,
                         const float* kernel, float* acc) const {
    if (dense_tiles.empty()) return;
    const int chunk =
        dense_tiles.size() > 1 ? std::max<int>(1, kChunkBytes / (block_size_ * sizeof(float)))
                               : input_dim_;
    for (const auto& [start, tile] : dense_tiles) {
      std::fill_n(acc + start * block_size_, tile * block_size_, 0.0f);
    }
    for (int first_row = 0; first_row < input_dim_; first_row += chunk) {
      const int rows = std::min(chunk, input_dim_ - first_row);
      for (const auto& [start, tile] : dense_tiles) {
        const float* tile_x[kMostTile];
        TileInputs(members + start, tile, x_ + first_row, input_dim_, tile_x);
        Product(tile, tile_x, kernel + first_row * stride_, stride_, block_size_, nullptr, rows,
                acc + start * block_size_);
      }
    }
  }

  // out = activation(sums + bias) for one block of one example.
  void Write(const float* sums, const float* bias, float* out) const {
    for (int i = 0; i < block_size_; ++i) {
      const float value = bias == nullptr ? sums[i] : sums[i] + bias[i];
      out[i] = relu_ ? std::max(value, 0.0f) : value;
    }
  }

  const float* x_;
  int input_dim_;
  const std::vector<Nonzeros>& nonzeros_;
  const float* kernel_;
  int64_t block_offset_;
  int64_t stride_;
  int block_size_;
  const float* bias_;
  bool relu_;
};

// Input `index`: a tensor, or the value of the variable a resource handle
// names (held in `holder`, its buffer shared, not copied). Null when an
// error was set.
const Tensor* Weight(OpKernelContext* context, int index, Tensor* holder) {
  if (context->input_dtype(index) != DT_RESOURCE) return &context->input(index);
  ::tensorflow::core::RefCountPtr<Var> variable;
  const absl::Status status =
      ::tensorflow::LookupResource(context, ::tensorflow::HandleFromInput(context, index),
                                   &variable);
  if (!status.ok()) {
    context->SetStatus(status);
    return nullptr;
  }
  ::tensorflow::tf_shared_lock lock(*variable->mu());
  if (variable->tensor()->dtype() != ::tensorflow::DT_FLOAT) {
    context->SetStatus(InvalidArgument("the variable of input ", index, " must be float32, got ",
                                       ::tensorflow::DataTypeString(variable->tensor()->dtype())));
    return nullptr;
  }
  *holder = *variable->tensor();
  return holder;
}

// Checks `inputs` (batch, input_dim) and `bias` (units or empty). False
// when an error was set.
bool CheckInputsAndBias(OpKernelContext* context, const Tensor& inputs, int64_t input_dim,
                        const Tensor& bias, int64_t units) {
  if (inputs.dims() != 2 || inputs.dim_size(1) != input_dim) {
    context->SetStatus(InvalidArgument("inputs must be (batch, ", input_dim, "), got ",
                                       inputs.shape().DebugString()));
    return false;
  }
  if (bias.dims() != 1 || (bias.dim_size(0) != units && bias.dim_size(0) != 0)) {
    context->SetStatus(InvalidArgument("bias must be (", units, ",) or empty, got ",
                                       bias.shape().DebugString()));
    return false;
  }
  return true;
}

const float* BiasOrNull(const Tensor& bias) {
  return bias.dim_size(0) ? bias.flat<float>().data() : nullptr;
}

bool CheckBlockKernel(OpKernelContext* context, const Tensor& block_kernel) {
  if (block_kernel.dims() != 3) {
    context->SetStatus(InvalidArgument("block_kernel must be (blocks, input_dim, block_size), got ",
                                       block_kernel.shape().DebugString()));
    return false;
  }
  return true;
}

// The products of the blocks of the block-major kernel (blocks, input_dim,
// block_size) that `examples_of` lists for each block.
void BlockKernelProducts(OpKernelContext* context, const Tensor& inputs,
                         const Tensor& block_kernel, const Tensor& bias, bool relu,
                         const std::vector<Nonzeros>& nonzeros,
                         const std::vector<std::vector<int>>& examples_of, float* outputs) {
  const int input_dim = static_cast<int>(block_kernel.dim_size(1));
  const int block_size = static_cast<int>(block_kernel.dim_size(2));
  BlockProducts products(inputs.flat<float>().data(), input_dim, nonzeros,
                         block_kernel.flat<float>().data(),
                         static_cast<int64_t>(input_dim) * block_size, block_size, block_size,
                         BiasOrNull(bias), relu);
  products.Run(context, examples_of, outputs,
               static_cast<int>(block_kernel.dim_size(0)) * block_size);
}

// A layer kind the ops run: its weights (inputs of the op, in this order),
// the check of their shapes against the inputs (its units, or -1 when an
// error was set), and its products into zeroed (batch, units) outputs.
struct LayerKind {
  const char* name;
  int weights;
  int64_t (*check)(OpKernelContext*, const Tensor& inputs, const Tensor* const* weights);
  void (*run)(OpKernelContext*, const Tensor& inputs, const Tensor* const* weights, bool relu,
              float* outputs);
};

// GatedDense with its threshold policy: policy_kernel, policy_bias,
// block_kernel, bias.
int64_t CheckGatedDense(OpKernelContext* context, const Tensor& inputs,
                        const Tensor* const* weights) {
  const Tensor& policy_kernel = *weights[0];
  const Tensor& policy_bias = *weights[1];
  const Tensor& block_kernel = *weights[2];
  if (!CheckBlockKernel(context, block_kernel)) return -1;
  const int64_t blocks = block_kernel.dim_size(0);
  const int64_t input_dim = block_kernel.dim_size(1);
  const int64_t units = blocks * block_kernel.dim_size(2);
  if (policy_kernel.dims() != 2 || policy_kernel.dim_size(0) != input_dim ||
      policy_kernel.dim_size(1) != blocks) {
    context->SetStatus(InvalidArgument("policy_kernel must be (", input_dim, ", ", blocks,
                                       "), got ", policy_kernel.shape().DebugString()));
    return -1;
  }
  if (policy_bias.dims() != 1 || policy_bias.dim_size(0) != blocks) {
    context->SetStatus(InvalidArgument("policy_bias must be (", blocks, ",), got ",
                                       policy_bias.shape().DebugString()));
    return -1;
  }
  return CheckInputsAndBias(context, inputs, input_dim, *weights[3], units) ? units : -1;
}

// The threshold policy's decision, as GatedDense takes it: for each block,
// the examples whose logit is above 0, in order; and every example's
// non-zero inputs, into `nonzeros` (batch). The examples (in chunks where
// ForChunks shares the policy's multiply-adds among threads) find their
// non-zero inputs, then their logits a tile of examples at a time over the
// rows they use.
std::vector<std::vector<int>> Decide(OpKernelContext* context, const Tensor& inputs,
                                     const Tensor* const* weights,
                                     std::vector<Nonzeros>* nonzeros) {
  const int64_t blocks = weights[2]->dim_size(0);
  const int input_dim = static_cast<int>(weights[2]->dim_size(1));
  const int64_t batch = inputs.dim_size(0);
  const float* x = inputs.flat<float>().data();
  const float* wp = weights[0]->flat<float>().data();
  std::vector<float> logits(batch * blocks);
  std::vector<int> examples(batch);
  for (int64_t e = 0; e < batch; ++e) examples[e] = static_cast<int>(e);
  ForChunks(context, batch, batch * input_dim * blocks,
            [&](int64_t first, int64_t last) {
    FindNonzeros(x, first, last, input_dim, nonzeros);
    Scratch scratch(input_dim);
    ForEachTile(examples.data() + first, static_cast<int>(last - first), *nonzeros,
                static_cast<int>(blocks), [&](int start, int tile) {
      const int* members = examples.data() + first + start;
      TileRun(members, tile, x, input_dim, *nonzeros, wp, blocks, static_cast<int>(blocks),
              ReadsEveryRow(members, tile, *nonzeros, input_dim, &scratch), &scratch,
              logits.data() + (first + start) * blocks);
    });
  });
  // Counted, then listed without a branch per pair: a branch and a
  // push_back each took 45 us of the op's 1.3 ms (784 -> 16 x 16, density
  // 3/4, batch 256, two threads), against 12 us.
  const float* bp = weights[1]->flat<float>().data();
  std::vector<int> counts(blocks, 0);
  for (int64_t e = 0; e < batch; ++e) {
    const float* row = logits.data() + e * blocks;
    for (int64_t j = 0; j < blocks; ++j) counts[j] += row[j] + bp[j] > 0.0f;
  }
  std::vector<std::vector<int>> examples_of(blocks);
  for (int64_t j = 0; j < blocks; ++j) examples_of[j].resize(counts[j] + 1);
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t e = 0; e < batch; ++e) {
    const float* row = logits.data() + e * blocks;
    for (int64_t j = 0; j < blocks; ++j) {
      examples_of[j][counts[j]] = static_cast<int>(e);  // kept where the logit is above 0
      counts[j] += row[j] + bp[j] > 0.0f;
    }
  }
  for (int64_t j = 0; j < blocks; ++j) examples_of[j].resize(counts[j]);
  return examples_of;
}

// A GatedDense layer into zeroed outputs: its decision, written to `mask`
// (batch x blocks) unless null, and its products, unless `fallback_fraction`
// f > 0 and, above batch 1, at least f of the (example, block) pairs are
// active (left to a dense product). Returns whether it computed them.
bool GatedDenseLayer(OpKernelContext* context, const Tensor& inputs, const Tensor* const* weights,
                     bool relu, float fallback_fraction, float* outputs, float* mask) {
  const int64_t batch = inputs.dim_size(0);
  const int64_t blocks = weights[2]->dim_size(0);
  std::vector<Nonzeros> nonzeros(batch);
  const std::vector<std::vector<int>> examples_of = Decide(context, inputs, weights, &nonzeros);
  int64_t pairs = 0;
  for (int64_t j = 0; j < blocks; ++j) {
    if (mask != nullptr) {
      for (int e : examples_of[j]) mask[e * blocks + j] = 1.0f;
    }
    pairs += examples_of[j].size();
  }
  if (fallback_fraction > 0.0f && batch > 1 &&
      pairs >= static_cast<double>(fallback_fraction) * batch * blocks) {
    return false;
  }
  BlockKernelProducts(context, inputs, *weights[2], *weights[3], relu, nonzeros, examples_of,
                      outputs);
  return true;
}

void RunGatedDense(OpKernelContext* context, const Tensor& inputs, const Tensor* const* weights,
                   bool relu, float* outputs) {
  GatedDenseLayer(context, inputs, weights, relu, 0.0f, outputs, nullptr);
}

// Dense: kernel (input_dim, units), bias.
int64_t CheckDense(OpKernelContext* context, const Tensor& inputs, const Tensor* const* weights) {
  const Tensor& kernel = *weights[0];
  if (kernel.dims() != 2) {
    context->SetStatus(InvalidArgument("kernel must be (input_dim, units), got ",
                                       kernel.shape().DebugString()));
    return -1;
  }
  const int64_t units = kernel.dim_size(1);
  return CheckInputsAndBias(context, inputs, kernel.dim_size(0), *weights[1], units) ? units : -1;
}

// The kernel's columns as one block up to 64 units, or 96 or 128 (widths
// with a product of their own), else as blocks of 64 (the last one
// narrower); every example active in every block. 100 units in one block
// ran the scalar loop: 2-3x slower at batches 50 and 256.
void RunDense(OpKernelContext* context, const Tensor& inputs, const Tensor* const* weights,
              bool relu, float* outputs) {
  const Tensor& kernel = *weights[0];
  const int64_t input_dim = kernel.dim_size(0);
  const int64_t units = kernel.dim_size(1);
  const int64_t batch = inputs.dim_size(0);
  const float* x = inputs.flat<float>().data();
  const std::vector<Nonzeros> nonzeros = FindNonzeros(x, batch, static_cast<int>(input_dim));
  constexpr int64_t kColumns = 64;
  const int64_t width = units <= kColumns || units == 96 || units == 128 ? units : kColumns;
  const int64_t full = units / width;
  std::vector<std::vector<int>> every(full, std::vector<int>(batch));
  for (auto& members : every) {
    for (int64_t e = 0; e < batch; ++e) members[e] = static_cast<int>(e);
  }
  const float* k = kernel.flat<float>().data();
  const float* b = BiasOrNull(*weights[1]);
  BlockProducts(x, static_cast<int>(input_dim), nonzeros, k, width, units,
                static_cast<int>(width), b, relu)
      .Run(context, every, outputs, static_cast<int>(units));
  const int64_t rest = units - full * width;
  if (rest > 0) {
    every.resize(1);
    BlockProducts(x, static_cast<int>(input_dim), nonzeros, k + full * width, 0, units,
                  static_cast<int>(rest), b == nullptr ? nullptr : b + full * width, relu)
        .Run(context, every, outputs + full * width, static_cast<int>(units));
  }
}

constexpr LayerKind kGatedDense = {"gated_dense", 4, CheckGatedDense, RunGatedDense};
constexpr LayerKind kDense = {"dense", 2, CheckDense, RunDense};
constexpr int kMostWeights = 4;

// Layers run one after the other on `inputs`, each reading its weights
// from the op's next inputs (tensors or variables' handles): one layer
// (KerasCondcompGatedDense, KerasCondcompDense) or a chain of them
// (KerasCondcompChain, attributes `layers` and `activations`).
class LayersOp : public OpKernel {
 public:
  // `kind`: the op's one layer, its activation the attribute
  // `activation`; null: a chain, as its attributes say.
  LayersOp(OpKernelConstruction* context, const LayerKind* kind) : OpKernel(context) {
    std::vector<std::string> activations;
    if (kind != nullptr) {
      layers_.push_back(kind);
      activations.emplace_back();
      OP_REQUIRES_OK(context, context->GetAttr("activation", &activations[0]));
    } else {
      std::vector<std::string> names;
      OP_REQUIRES_OK(context, context->GetAttr("layers", &names));
      OP_REQUIRES_OK(context, context->GetAttr("activations", &activations));
      OP_REQUIRES(context, !names.empty() && names.size() == activations.size(),
                  InvalidArgument("layers and activations must be as many (at least one), got ",
                                  names.size(), " and ", activations.size()));
      for (const std::string& name : names) {
        if (name == kGatedDense.name) {
          layers_.push_back(&kGatedDense);
        } else if (name == kDense.name) {
          layers_.push_back(&kDense);
        } else {
          OP_REQUIRES(context, false,
                      InvalidArgument("layers must be 'gated_dense' or 'dense', got '", name,
                                      "'"));
        }
      }
    }
    for (const std::string& activation : activations) {
      OP_REQUIRES(context, activation == "relu" || activation == "linear",
                  InvalidArgument("activations must be 'relu' or 'linear', got '", activation,
                                  "'"));
      relu_.push_back(activation == "relu");
    }
  }

  void Compute(OpKernelContext* context) override {
    int weights_needed = 1;
    for (const LayerKind* kind : layers_) weights_needed += kind->weights;
    OP_REQUIRES(context, context->num_inputs() == weights_needed,
                InvalidArgument("the layers take ", weights_needed - 1, " weights, got ",
                                context->num_inputs() - 1));
    Tensor values[2];  // a chain's outputs so far, and the next layer's
    const Tensor* inputs = &context->input(0);
    int next = 1;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerKind& kind = *layers_[i];
      Tensor held[kMostWeights];
      const Tensor* weights[kMostWeights];
      for (int w = 0; w < kind.weights; ++w) {
        weights[w] = Weight(context, next + w, &held[w]);
        if (weights[w] == nullptr) return;
      }
      next += kind.weights;
      const int64_t units = kind.check(context, *inputs, weights);
      if (units < 0) return;
      const TensorShape shape({inputs->dim_size(0), units});
      Tensor* outputs = nullptr;
      if (i + 1 == layers_.size()) {
        OP_REQUIRES_OK(context, context->allocate_output(0, shape, &outputs));
      } else {
        outputs = &values[i % 2];
        OP_REQUIRES_OK(context,
                       context->allocate_temp(::tensorflow::DT_FLOAT, shape, outputs));
      }
      float* data = outputs->flat<float>().data();
      std::memset(data, 0, sizeof(float) * outputs->NumElements());
      kind.run(context, *inputs, weights, relu_[i], data);
      inputs = outputs;
    }
  }

 private:
  std::vector<const LayerKind*> layers_;
  std::vector<bool> relu_;
};

// One GatedDense layer (GatedDenseLayer, with the attribute
// `fallback_fraction`), which also outputs its block mask and whether it
// computed the products.
class GatedDenseOp : public OpKernel {
 public:
  explicit GatedDenseOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string activation;
    OP_REQUIRES_OK(context, context->GetAttr("activation", &activation));
    relu_ = activation == "relu";
    OP_REQUIRES_OK(context, context->GetAttr("fallback_fraction", &fallback_fraction_));
    OP_REQUIRES(context, fallback_fraction_ >= 0.0f && fallback_fraction_ <= 1.0f,
                InvalidArgument("fallback_fraction must be in [0, 1], got ", fallback_fraction_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& inputs = context->input(0);
    Tensor held[kMostWeights];
    const Tensor* weights[kMostWeights];
    for (int w = 0; w < kGatedDense.weights; ++w) {
      weights[w] = Weight(context, 1 + w, &held[w]);
      if (weights[w] == nullptr) return;
    }
    const int64_t units = CheckGatedDense(context, inputs, weights);
    if (units < 0) return;
    const int64_t batch = inputs.dim_size(0);
    const int64_t blocks = weights[2]->dim_size(0);
    Tensor* output = nullptr;
    Tensor* block_mask = nullptr;
    Tensor* computed = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, units}), &output));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({batch, blocks}), &block_mask));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({}), &computed));
    float* outputs = output->flat<float>().data();
    float* mask = block_mask->flat<float>().data();
    std::memset(outputs, 0, sizeof(float) * output->NumElements());
    std::memset(mask, 0, sizeof(float) * block_mask->NumElements());
    computed->scalar<bool>()() =
        GatedDenseLayer(context, inputs, weights, relu_, fallback_fraction_, outputs, mask);
  }

 private:
  bool relu_ = false;
  float fallback_fraction_ = 0.0f;
};

class DenseOp : public LayersOp {
 public:
  explicit DenseOp(OpKernelConstruction* context) : LayersOp(context, &kDense) {}
};

class ChainOp : public LayersOp {
 public:
  explicit ChainOp(OpKernelConstruction* context) : LayersOp(context, nullptr) {}
};

class BlockSparseDenseOp : public OpKernel {
 public:
  explicit BlockSparseDenseOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string activation;
    OP_REQUIRES_OK(context, context->GetAttr("activation", &activation));
    relu_ = activation == "relu";
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& inputs = context->input(0);
    const Tensor& block_kernel = context->input(1);
    const Tensor& bias = context->input(2);
    const Tensor& block_mask = context->input(3);
    if (!CheckBlockKernel(context, block_kernel)) return;
    const int64_t blocks = block_kernel.dim_size(0);
    const int64_t input_dim = block_kernel.dim_size(1);
    const int64_t units = blocks * block_kernel.dim_size(2);
    if (!CheckInputsAndBias(context, inputs, input_dim, bias, units)) return;
    const int64_t batch = inputs.dim_size(0);
    OP_REQUIRES(context,
                block_mask.dims() == 2 && block_mask.dim_size(0) == batch &&
                    block_mask.dim_size(1) == blocks,
                InvalidArgument("block_mask must be (", batch, ", ", blocks, "), got ",
                                block_mask.shape().DebugString()));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, units}), &output));
    float* outputs = output->flat<float>().data();
    std::memset(outputs, 0, sizeof(float) * batch * units);
    const float* mask = block_mask.flat<float>().data();
    std::vector<std::vector<int>> examples_of(blocks);
    for (int64_t e = 0; e < batch; ++e) {
      for (int64_t j = 0; j < blocks; ++j) {
        if (mask[e * blocks + j] != 0.0f) examples_of[j].push_back(static_cast<int>(e));
      }
    }
    const std::vector<Nonzeros> nonzeros =
        FindNonzeros(inputs.flat<float>().data(), batch, static_cast<int>(input_dim));
    BlockKernelProducts(context, inputs, block_kernel, bias, relu_, nonzeros, examples_of,
                        outputs);
  }

 private:
  bool relu_ = false;
};

absl::Status MatrixOutput(shape_inference::InferenceContext* c, int units_input) {
  shape_inference::ShapeHandle inputs;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &inputs));
  shape_inference::ShapeHandle kernel = c->input(units_input);
  shape_inference::DimensionHandle units;
  if (c->RankKnown(kernel) && c->Rank(kernel) == 3) {
    TF_RETURN_IF_ERROR(c->Multiply(c->Dim(kernel, 0), c->Dim(kernel, 2), &units));
  } else if (c->RankKnown(kernel) && c->Rank(kernel) == 2) {
    units = c->Dim(kernel, 1);
  } else {
    units = c->UnknownDim();
  }
  c->set_output(0, c->Matrix(c->Dim(inputs, 0), units));
  return absl::OkStatus();
}

REGISTER_OP("KerasCondcompGatedDense")
    .Input("inputs: float")
    .Input("policy_kernel: float")
    .Input("policy_bias: float")
    .Input("block_kernel: float")
    .Input("bias: float")
    .Attr("activation: {'linear', 'relu'} = 'linear'")
    .Attr("fallback_fraction: float = 0")
    .Output("outputs: float")
    .Output("block_mask: float")
    .Output("computed: bool")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      TF_RETURN_IF_ERROR(MatrixOutput(c, 3));
      shape_inference::ShapeHandle policy_kernel = c->input(1);
      c->set_output(1, c->Matrix(c->Dim(c->input(0), 0),
                                 c->RankKnown(policy_kernel) && c->Rank(policy_kernel) == 2
                                     ? c->Dim(policy_kernel, 1)
                                     : c->UnknownDim()));
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("KerasCondcompGatedDense").Device(DEVICE_CPU), GatedDenseOp);

REGISTER_OP("KerasCondcompBlockSparseDense")
    .Input("inputs: float")
    .Input("block_kernel: float")
    .Input("bias: float")
    .Input("block_mask: float")
    .Attr("activation: {'linear', 'relu'} = 'linear'")
    .Output("outputs: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) { return MatrixOutput(c, 1); });
REGISTER_KERNEL_BUILDER(Name("KerasCondcompBlockSparseDense").Device(DEVICE_CPU),
                        BlockSparseDenseOp);

REGISTER_OP("KerasCondcompDense")
    .Input("inputs: float")
    .Input("kernel: float")
    .Input("bias: float")
    .Attr("activation: {'linear', 'relu'} = 'linear'")
    .Output("outputs: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) { return MatrixOutput(c, 1); });
REGISTER_KERNEL_BUILDER(Name("KerasCondcompDense").Device(DEVICE_CPU), DenseOp);

// Weights: each layer's, in order (a variable's handle or a tensor; an
// empty tensor for no bias). Its output's width is known only when run.
REGISTER_OP("KerasCondcompChain")
    .Input("inputs: float")
    .Input("weights: Tweights")
    .Attr("Tweights: list({float, resource})")
    .Attr("layers: list(string)")
    .Attr("activations: list(string)")
    .Output("outputs: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle inputs;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &inputs));
      c->set_output(0, c->Matrix(c->Dim(inputs, 0), c->UnknownDim()));
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("KerasCondcompChain").Device(DEVICE_CPU), ChainOp);

// The floats in one of the kernels' vectors as built: 16 with AVX-512, else 8.
class VectorLanesOp : public OpKernel {
 public:
  explicit VectorLanesOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    Tensor* lanes = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({}), &lanes));
    lanes->scalar<int32_t>()() = kVectorLanes;
  }
};

REGISTER_OP("KerasCondcompVectorLanes")
    .Output("lanes: int32")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("KerasCondcompVectorLanes").Device(DEVICE_CPU), VectorLanesOp);

}  // namespace
}  // namespace keras_condcomp
