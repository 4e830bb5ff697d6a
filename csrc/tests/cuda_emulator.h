// CPU emulation of the CUDA execution model and of the runtime calls the kernels and their tests
// use, so that the kernel tests run the real kernel code (csrc/lm_step.cuh) on a machine without
// a GPU, as CI does. Force-included (-include) ahead of every source when csrc/ is compiled as
// plain C++ with LMF_CUDA_EMULATION defined (tools/run_emulated.sh).
//
// * A block's threads run as fibers on one OS thread, in threadIdx order; each runs until it
//   reaches __syncthreads or returns. When every thread has arrived (or returned), the barrier
//   opens. Blocks run one after the other, so a `static` array is a block's __shared__. A fiber
//   is made once (ucontext) and then serves every block and launch; switches are
//   __builtin_setjmp/__builtin_longjmp (no system call, no unwinding: a switch saves only the
//   stack, frame and resume addresses).
// * Warp shuffles exchange values through block-wide slot arrays behind a barrier, which is right
//   for code that, like block_sum, calls them with the whole block. Two arrays, used in turn: a
//   thread writes one again only after the next shuffle's barrier, when every thread has read it.
// * Blocks run one at a time, in blockIdx order or, for the tests of orders (set_block_order),
//   in reverse or in a shuffled order: a reduction's result must not depend on which block
//   finishes last. Atomics are plain read-modify-writes and fences no-ops (one OS thread).
// * Device memory is host memory; streams are ignored; launches complete before they return.
// It checks indexing, reductions, tiling and flags, not timing or memory-model subtleties.
#pragma once

#define __launch_bounds__(...)
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace lmf_emu {

// A switch point: __builtin_setjmp's buffer (frame, resume address, stack).
using SwitchPoint = void* [5];

struct Fiber {
  ucontext_t start{};     // entered once, to run fiber_main on the fiber's own stack
  SwitchPoint resume{};   // where the fiber continues: after a barrier, or for the next block
  std::vector<char> stack;
  bool started = false;  // made and entered (it then lives as long as the process)
  bool at_barrier = false;
  bool done = false;  // returned from this block's kernel body
  int next_slots = 0;  // which slot array this thread's next shuffle uses (0 or 1)
};

// The order in which a launch runs its blocks.
enum class BlockOrder { kForward, kReverse, kShuffled };

struct State {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  // Owned one by one: growing the list moves no fiber (their stacks hold live frames).
  std::vector<std::unique_ptr<Fiber>> fibers;
  Fiber* running = nullptr;  // the running fiber, nullptr on the host
  SwitchPoint scheduler{};
  std::function<void()> body;
  std::vector<uint64_t> shuffle_slots[2];
  BlockOrder order = BlockOrder::kForward;
  uint64_t shuffle_seed = 0x9E3779B97F4A7C15ull;
};

// One for the process, initialised before main (no guard on the hot path: every threadIdx reads it).
inline State g_state;
inline State& state() { return g_state; }

inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulator: %s\n", what);
  std::abort();
}

// __builtin_longjmp may not share a function with the __builtin_setjmp it returns to.
[[noreturn]] __attribute__((noinline)) inline void jump_to(SwitchPoint& point) {
  __builtin_longjmp(point, 1);
}

// Saves the running fiber's resume point and returns to the scheduler; continues when resumed.
__attribute__((noinline)) inline void yield_to_scheduler() {
  State& s = state();
  if (__builtin_setjmp(s.running->resume) == 0) jump_to(s.scheduler);
}

// A fiber's life: run the kernel body for the current block, park, and run it again for the
// next block it is resumed for.
inline void fiber_main() {
  State& s = state();
  for (;;) {
    s.body();
    s.running->done = true;
    yield_to_scheduler();
  }
}

inline void sync_threads() {
  State& s = state();
  if (s.running == nullptr) fail("__syncthreads outside a kernel");
  s.running->at_barrier = true;
  yield_to_scheduler();
}

// Runs thread t (fiber f) until its next barrier or its end.
__attribute__((noinline)) inline void resume_thread(unsigned t, Fiber& f) {
  State& s = state();
  s.running = &f;
  s.thread_idx = uint3{t, 0, 0};
  if (__builtin_setjmp(s.scheduler) != 0) return;  // back from the fiber
  if (!f.started) {
    f.started = true;
    setcontext(&f.start);
  }
  jump_to(f.resume);
}

// Runs one block: every thread to its next barrier (or its end), then opens the barrier, until
// all have returned.
inline void run_block(unsigned threads) {
  State& s = state();
  constexpr size_t kStack = 256 * 1024;
  while (s.fibers.size() < threads) {
    Fiber& f = *s.fibers.emplace_back(std::make_unique<Fiber>());
    f.stack.resize(kStack);
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = f.stack.data();
    f.start.uc_stack.ss_size = f.stack.size();
    f.start.uc_link = nullptr;
    makecontext(&f.start, fiber_main, 0);
  }
  for (std::vector<uint64_t>& slots : s.shuffle_slots) slots.assign(threads, 0);
  for (unsigned t = 0; t < threads; ++t) {
    s.fibers[t]->done = false;
    s.fibers[t]->next_slots = 0;
  }
  // A round resumes every thread that has not returned: each was waiting at the barrier, which
  // opens for it, or (first round) has not started. It runs to the next barrier or its end.
  for (bool waiting = true; waiting;) {
    waiting = false;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = *s.fibers[t];
      if (f.done) continue;
      f.at_barrier = false;
      resume_thread(t, f);
      waiting = waiting || f.at_barrier;
    }
    s.running = nullptr;
  }
}

inline void set_block_order(BlockOrder order) { state().order = order; }

// The block indices of a grid in the current order (a shuffle differs from launch to launch).
inline std::vector<unsigned> block_order(unsigned grid) {
  State& s = state();
  std::vector<unsigned> order(grid);
  for (unsigned b = 0; b < grid; ++b) order[b] = b;
  if (s.order == BlockOrder::kReverse) {
    for (unsigned b = 0; b < grid / 2; ++b) std::swap(order[b], order[grid - 1 - b]);
  } else if (s.order == BlockOrder::kShuffled) {
    for (unsigned b = grid; b > 1; --b) {  // Fisher-Yates with a xorshift generator
      s.shuffle_seed ^= s.shuffle_seed << 13;
      s.shuffle_seed ^= s.shuffle_seed >> 7;
      s.shuffle_seed ^= s.shuffle_seed << 17;
      std::swap(order[b - 1], order[s.shuffle_seed % b]);
    }
  }
  return order;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  State& s = state();
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) fail("only 1-D launches");
  s.grid_dim = grid;
  s.block_dim = block;
  s.body = [&] { kernel(args...); };
  for (unsigned b : block_order(grid.x)) {
    s.block_idx = uint3{b, 0, 0};
    run_block(block.x);
  }
  s.body = nullptr;
}

}  // namespace lmf_emu

#define LMF_LAUNCH(KERNEL, GRID, BLOCK, STREAM, ...) \
  ::lmf_emu::launch(KERNEL, dim3(GRID), dim3(BLOCK), __VA_ARGS__)
#define threadIdx (::lmf_emu::state().thread_idx)
#define blockIdx (::lmf_emu::state().block_idx)
#define blockDim (::lmf_emu::state().block_dim)
#define gridDim (::lmf_emu::state().grid_dim)

inline void __syncthreads() { ::lmf_emu::sync_threads(); }

namespace lmf_emu {
// The value `value` of thread src (in the calling thread's warp; src_of(lane) < 0: its own).
template <typename T, typename F>
T shuffle(T value, F&& src_of) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  State& s = state();
  const unsigned t = s.thread_idx.x;
  int& turn = s.running->next_slots;
  std::vector<uint64_t>& slots = s.shuffle_slots[turn];
  turn ^= 1;
  std::memcpy(&slots[t], &value, sizeof(T));
  __syncthreads();
  T result = value;
  const int src = src_of(t);
  if (src >= 0) std::memcpy(&result, &slots[static_cast<unsigned>(src)], sizeof(T));
  return result;
}
}  // namespace lmf_emu

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, unsigned delta, int width = 32) {
  return lmf_emu::shuffle(value, [&](unsigned t) {
    const unsigned lane = t % static_cast<unsigned>(width);
    return lane + delta < static_cast<unsigned>(width) ? static_cast<int>(t + delta) : -1;
  });
}

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int width = 32) {
  return lmf_emu::shuffle(value, [&](unsigned t) {
    const unsigned w = static_cast<unsigned>(width), base = t - t % w;
    const unsigned src = base + ((t % w) ^ static_cast<unsigned>(lane_mask));
    return src < base + w ? static_cast<int>(src) : -1;
  });
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence() {}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}
