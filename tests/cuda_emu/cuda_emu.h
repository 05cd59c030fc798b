// cuda_emu.h: the CUDA C built-ins npgpt's raw kernels use, for g++ (C++20) on the CPU.
//
// A kernel source string, unchanged, is compiled after this header and linked with
// cuda_emu_runtime.cpp (threads, barriers, the launch; compiled once and cached) into a small
// program that tests/cuda_emu/driver.py runs. One launch runs like this:
//
//   * one std::thread per CUDA thread of a block; the same threads run every block, one block at
//     a time, blocks in an order shuffled by a seed (a kernel may not rely on block order);
//   * __syncthreads() is a std::barrier over the block's threads;
//   * __shfl_*_sync() and __syncwarp() are a std::barrier over the lanes of that warp only (a
//     warp: the threads whose linear index / 32 is the same), so a shuffle inside `if (warp == 0)`
//     works as on a GPU while the other warps go on;
//   * __shared__ variables live in one linker section that is filled with 0xFF bytes (NaN as a
//     float, -1 as an int) before each block: shared memory lives for one block and starts as
//     garbage, as on a GPU.
//
// What a GPU leaves undefined fails here with a message on stderr and exit status 86:
//   * a barrier that only some threads reach (some exited, some wait elsewhere): a deadlock is
//     detected as soon as every thread of the block is waiting or finished, and the report says
//     where each thread waits (function, line of the kernel source);
//   * threads of one barrier phase at different __syncthreads() / shuffle call sites;
//   * a shuffle mask that is not the warp's full set of lanes, or a lane reading a lane that does
//     not exist;
//   * no progress for the watchdog's timeout (an endless loop): the report says where each thread is.
//
// std::source_location (C++20) gives each barrier call its site without macros over the kernel.
#pragma once

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <source_location>
#include <type_traits>

// ---- CUDA's declaration specifiers -------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Shared variables: static storage in one section, refilled before each block (Block::poison_shared
// in cuda_emu_runtime.cpp).
#define __shared__ __attribute__((section("cuda_emu_shared"))) static

struct uint3 { unsigned int x = 0, y = 0, z = 0; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emu {

// The runtime's side (cuda_emu_runtime.cpp): who this thread is, and the barriers.
extern thread_local uint3 t_thread_idx;
extern thread_local uint3 t_block_idx;
extern thread_local int t_tid;                  // linear thread index in the block
extern dim3 g_block_dim, g_grid_dim;

void sync_block(const char* what, const std::source_location& loc);
void sync_warp(const char* what, unsigned mask, const std::source_location& loc);
std::uint64_t* warp_slots();                    // this warp's 32 exchange slots
int warp_lanes();                               // threads in this thread's warp (32 but in a partial warp)
[[noreturn]] void fail_read(const char* what, const std::source_location& loc, int lane, int src);

// The launch's arguments, for the call the driver writes: a region pointer or a scalar's bytes.
void* arg_ptr(int i);
std::uint64_t arg_bits(int i);

template <class T>
inline T arg(int i) {
    if constexpr (std::is_pointer_v<T>) {
        return static_cast<T>(arg_ptr(i));
    } else {
        static_assert(sizeof(T) <= 8);
        const std::uint64_t bits = arg_bits(i);
        T v;
        std::memcpy(&v, &bits, sizeof(T));
        return v;
    }
}

void call_kernel();                             // defined by the driver's code: the kernel call

// ---- shuffles ----------------------------------------------------------------------------------
// Each lane publishes its value in its slot, the warp meets, each lane reads its source lane's
// slot, the warp meets again (so no slot is overwritten before every lane has read it).
template <class T>
inline T shuffle(const char* what, unsigned mask, T v, int src, int lane, const std::source_location& loc) {
    static_assert(sizeof(T) <= 8, "cuda_emu: shuffles of types wider than 8 bytes are not emulated");
    std::uint64_t* slots = warp_slots();
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[lane] = bits;
    sync_warp(what, mask, loc);
    T out = v;
    if (src >= 0) {
        if (src >= warp_lanes()) fail_read(what, loc, lane, src);
        std::memcpy(&out, &slots[src], sizeof(T));
    }
    sync_warp(what, mask, loc);
    return out;
}

inline int lane_id() { return t_tid & 31; }

}  // namespace cuda_emu

// ---- built-in variables (read-only in kernel code) -----------------------------------------------
#define threadIdx (static_cast<const uint3&>(::cuda_emu::t_thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_emu::t_block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::g_grid_dim))
constexpr int warpSize = 32;

// ---- synchronisation ---------------------------------------------------------------------------
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
    cuda_emu::sync_block("__syncthreads", loc);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
    cuda_emu::sync_warp("__syncwarp", mask, loc);
}

inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
                     std::source_location loc = std::source_location::current()) {
    const int lane = cuda_emu::lane_id(), base = lane & ~(width - 1);
    return cuda_emu::shuffle("__shfl_sync", mask, v, base + (src_lane & (width - 1)), lane, loc);
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         std::source_location loc = std::source_location::current()) {
    const int lane = cuda_emu::lane_id(), src = lane ^ lane_mask;
    const int end = ((lane / width) + 1) * width;        // a later group's lane: keep your own value
    return cuda_emu::shuffle("__shfl_xor_sync", mask, v, src < end ? src : -1, lane, loc);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          std::source_location loc = std::source_location::current()) {
    const int lane = cuda_emu::lane_id(), src = lane + (int)delta;
    const int end = ((lane / width) + 1) * width;
    return cuda_emu::shuffle("__shfl_down_sync", mask, v, src < end ? src : -1, lane, loc);
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        std::source_location loc = std::source_location::current()) {
    const int lane = cuda_emu::lane_id(), src = lane - (int)delta;
    const int start = (lane / width) * width;
    return cuda_emu::shuffle("__shfl_up_sync", mask, v, src >= start ? src : -1, lane, loc);
}

// ---- intrinsics and device functions -------------------------------------------------------------
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __uint_as_float(unsigned i) { return std::bit_cast<float>(i); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline double __longlong_as_double(long long i) { return std::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return std::fmin(std::fmax(x, 0.0f), 1.0f); }
template <class T> inline T __ldg(const T* p) { return *p; }
[[noreturn]] void __trap();                     // fails the launch: "__trap() called"

// CUDA's min/max are overloaded device functions of two values of one type.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> inline T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;
}

