// cuda_emu_runtime.cpp: the threads, barriers and launch behind cuda_emu.h (see there).
// Compiled once per sanitizer mode and cached by the driver; each kernel program links it and
// supplies cuda_emu::call_kernel(). main() reads the launch from argv and the arrays from stdin.
#include <algorithm>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "cuda_emu.h"          // after the standard headers: its macros are CUDA's words only

extern char __start_cuda_emu_shared[] __attribute__((weak));
extern char __stop_cuda_emu_shared[] __attribute__((weak));

namespace cuda_emu {

thread_local uint3 t_thread_idx;
thread_local uint3 t_block_idx;
thread_local int t_tid = -1;
dim3 g_block_dim, g_grid_dim;

[[noreturn]] void fail(const std::string& msg) {
    std::fprintf(stderr, "cuda_emu: %s\n", msg.c_str());
    std::fflush(stderr);
    std::_Exit(86);
}

// Where one thread is: running kernel code, waiting at a barrier (which, from where), or done.
enum class State { Running, Sync, Warp, Done };

struct Where {
    State state = State::Running;
    const char* what = "";        // "__syncthreads", "__shfl_xor_sync", ...
    const char* func = "";
    unsigned line = 0;
    bool same_site(const Where& o) const {
        return state == o.state && line == o.line && std::strcmp(what, o.what) == 0 && std::strcmp(func, o.func) == 0;
    }
};

struct Block;
Block* g_block = nullptr;

// Completion steps of the barriers (run by the last thread to arrive, before any is released).
struct SyncDone { Block* b; void operator()() noexcept; };
struct WarpDone { Block* b; int warp; void operator()() noexcept; };
struct BlockDone { Block* b; void operator()() noexcept; };

// The threads of one block, their barriers, and the bookkeeping that turns a hang into a report.
struct Block {
    int nthreads, nwarps;
    std::vector<int> lanes;                       // threads in each warp (the last may be partial)
    std::mutex mu;
    std::vector<Where> where;                     // per thread
    int n_sync = 0, n_done = 0;
    std::vector<int> n_warp;
    std::unique_ptr<std::barrier<SyncDone>> sync_bar;
    std::vector<std::unique_ptr<std::barrier<WarpDone>>> warp_bar;
    std::unique_ptr<std::barrier<BlockDone>> done_bar;
    std::vector<std::uint64_t> slots;             // one 8-byte slot per thread for shuffles
    std::vector<unsigned> order;                  // linear block indices, shuffled
    std::size_t next = 0;                         // position in `order` of the block running now
    std::atomic<std::uint64_t> progress{0};       // barrier phases completed (for the watchdog)

    Block(int n, std::vector<unsigned> order_)
        : nthreads(n), nwarps((n + 31) / 32), where(n), n_warp((n + 31) / 32, 0),
          slots(n, 0), order(std::move(order_)) {
        for (int w = 0; w < nwarps; w++) lanes.push_back(std::min(32, n - 32 * w));
        sync_bar = std::make_unique<std::barrier<SyncDone>>(n, SyncDone{this});
        for (int w = 0; w < nwarps; w++)
            warp_bar.push_back(std::make_unique<std::barrier<WarpDone>>(lanes[w], WarpDone{this, w}));
        done_bar = std::make_unique<std::barrier<BlockDone>>(n, BlockDone{this});
    }

    static void poison_shared() {
        if (__start_cuda_emu_shared && __stop_cuda_emu_shared > __start_cuda_emu_shared)
            std::memset(__start_cuda_emu_shared, 0xFF, __stop_cuda_emu_shared - __start_cuda_emu_shared);
    }

    std::string block_name() const {
        const unsigned b = order[next < order.size() ? next : order.size() - 1];
        const unsigned gx = g_grid_dim.x, gy = g_grid_dim.y;
        return "block (" + std::to_string(b % gx) + "," + std::to_string(b / gx % gy) + "," +
               std::to_string(b / gx / gy) + ")";
    }

    std::string thread_name(int t) const {
        const int bx = g_block_dim.x, by = g_block_dim.y;
        return std::to_string(t % bx) + "," + std::to_string(t / bx % by) + "," + std::to_string(t / bx / by);
    }

    // "where each thread waits": threads grouped by state and site, as runs of linear indices.
    std::string report() const {
        std::string out;
        std::vector<bool> seen(nthreads, false);
        for (int t = 0; t < nthreads; t++) {
            if (seen[t]) continue;
            const Where& w = where[t];
            std::string ids;
            int count = 0, run_start = -1, prev = -2;
            auto flush = [&] {
                if (run_start < 0) return;
                if (!ids.empty()) ids += " ";
                ids += prev == run_start ? "(" + thread_name(run_start) + ")"
                                         : "(" + thread_name(run_start) + ")..(" + thread_name(prev) + ")";
            };
            for (int u = t; u < nthreads; u++) {
                if (seen[u] || !where[u].same_site(w)) continue;
                seen[u] = true;
                count++;
                if (u != prev + 1) { flush(); run_start = u; }
                prev = u;
            }
            flush();
            std::string site;
            switch (w.state) {
                case State::Done: site = "finished the kernel (returned)"; break;
                case State::Running: site = "still running kernel code"; break;
                default: site = std::string("wait at ") + w.what + "() in " + w.func + ", line " + std::to_string(w.line);
            }
            out += "\n  " + std::to_string(count) + " thread(s) " + site + ": threadIdx " + ids;
        }
        return out;
    }

    // Called with mu held after a thread starts waiting or finishes: if every thread waits or is
    // done and no barrier has all its threads, nothing can ever move again.
    void check_deadlock() {
        for (const Where& w : where)
            if (w.state == State::Running) return;
        if (n_sync == nthreads || n_done == nthreads) return;
        for (int w = 0; w < nwarps; w++)
            if (n_warp[w] == lanes[w]) return;
        fail("deadlock in " + block_name() + ": a barrier that only some threads reach" + report());
    }

    void wait_sync(const char* what, const std::source_location& loc) {
        {
            std::lock_guard<std::mutex> g(mu);
            where[t_tid] = Where{State::Sync, what, loc.function_name(), loc.line()};
            n_sync++;
            check_deadlock();
        }
        sync_bar->arrive_and_wait();
    }

    void wait_warp(const char* what, unsigned mask, const std::source_location& loc) {
        const int warp = t_tid / 32;
        const unsigned full = lanes[warp] == 32 ? 0xffffffffu : ((1u << lanes[warp]) - 1u);
        if (mask != full) {
            char buf[160];
            std::snprintf(buf, sizeof buf, "%s(mask 0x%08x) in %s, line %u: warp %d has lanes 0x%08x; "
                          "only the full mask of existing lanes is emulated", what, mask,
                          loc.function_name(), loc.line(), warp, full);
            fail(std::string(buf) + " (" + block_name() + ")");
        }
        {
            std::lock_guard<std::mutex> g(mu);
            where[t_tid] = Where{State::Warp, what, loc.function_name(), loc.line()};
            n_warp[warp]++;
            check_deadlock();
        }
        warp_bar[warp]->arrive_and_wait();
    }

    void finish_thread() {
        {
            std::lock_guard<std::mutex> g(mu);
            where[t_tid] = Where{State::Done, "", "", 0};
            n_done++;
            check_deadlock();
        }
        done_bar->arrive_and_wait();
    }

    // All waiting threads of one phase must be at the same call site.
    void check_sites(int first, int count, const char* kind) {
        for (int t = first + 1; t < first + count; t++)
            if (!where[t].same_site(where[first]))
                fail(std::string("threads of ") + block_name() + " reached different " + kind +
                     " call sites in one phase (undefined on a GPU)" + report());
    }
};

void SyncDone::operator()() noexcept {
    std::lock_guard<std::mutex> g(b->mu);
    b->check_sites(0, b->nthreads, "__syncthreads");
    for (Where& w : b->where) w.state = State::Running;
    b->n_sync = 0;
    b->progress++;
}

void WarpDone::operator()() noexcept {
    std::lock_guard<std::mutex> g(b->mu);
    b->check_sites(32 * warp, b->lanes[warp], "warp-synchronous");
    for (int t = 32 * warp; t < 32 * warp + b->lanes[warp]; t++) b->where[t].state = State::Running;
    b->n_warp[warp] = 0;
    b->progress++;
}

void BlockDone::operator()() noexcept {
    std::lock_guard<std::mutex> g(b->mu);
    for (Where& w : b->where) w = Where{};
    b->n_done = 0;
    b->next++;
    Block::poison_shared();
    b->progress++;
}

// ---- the header's side ---------------------------------------------------------------------------
void sync_block(const char* what, const std::source_location& loc) { g_block->wait_sync(what, loc); }
void sync_warp(const char* what, unsigned mask, const std::source_location& loc) { g_block->wait_warp(what, mask, loc); }
std::uint64_t* warp_slots() { return &g_block->slots[t_tid & ~31]; }
int warp_lanes() { return g_block->lanes[t_tid / 32]; }

void fail_read(const char* what, const std::source_location& loc, int lane, int src) {
    fail(std::string(what) + " in " + loc.function_name() + ", line " + std::to_string(loc.line()) +
         ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) + ", which does not exist");
}

// ---- the launch ----------------------------------------------------------------------------------
// Arguments come on the command line, array bytes on stdin; the arrays go back on stdout.
//   argv: grid "x,y,z", block "x,y,z", seed, watchdog seconds, region sizes "n0,n1,..." (or "-"),
//         then one word per kernel argument: "r<region>+<byte offset>" or the scalar's bytes as hex.
// Each region (one array, or overlapping arrays merged by the driver) gets its own malloc of exactly
// its size, so AddressSanitizer sees a read one past the end as an overflow.
struct Launch {
    dim3 grid, block;
    unsigned long long seed = 0;
    double watchdog_s = 60;
    std::vector<unsigned char*> regions;
    std::vector<std::size_t> sizes;
    std::vector<std::string> args;

    static dim3 parse_dim(const char* s) {
        unsigned x = 1, y = 1, z = 1;
        if (std::sscanf(s, "%u,%u,%u", &x, &y, &z) != 3) fail(std::string("bad launch dims ") + s);
        return dim3(x, y, z);
    }

    int data_fd = -1;                               // the real stdout: the arrays go back on it

    Launch(int argc, char** argv) {
        if (argc < 6) fail("usage: kernel grid block seed watchdog regions args...");
        data_fd = ::dup(1);                         // printf in a kernel goes to stderr, not into the data
        if (data_fd < 0 || ::dup2(2, 1) < 0) fail("cannot set up the output streams");
        grid = parse_dim(argv[1]);
        block = parse_dim(argv[2]);
        seed = std::strtoull(argv[3], nullptr, 10);
        watchdog_s = std::strtod(argv[4], nullptr);
        if (std::strcmp(argv[5], "-") != 0) {
            for (const char* p = argv[5]; *p;) {
                char* end;
                sizes.push_back(std::strtoull(p, &end, 10));
                p = *end == ',' ? end + 1 : end;
            }
        }
        for (std::size_t n : sizes) {
            auto* mem = static_cast<unsigned char*>(std::malloc(n ? n : 1));
            if (!mem) fail("out of memory");
            if (n && std::fread(mem, 1, n, stdin) != n) fail("short read of array data on stdin");
            regions.push_back(mem);
        }
        for (int i = 6; i < argc; i++) args.emplace_back(argv[i]);
    }

    const std::string& word(int i) const {
        if (i < 0 || (std::size_t)i >= args.size()) fail("missing kernel argument " + std::to_string(i));
        return args[i];
    }

    // Run `kernel` (a callable making the kernel call) over the whole grid.
    void run() {
        g_block_dim = block;
        g_grid_dim = grid;
        const unsigned nblocks = grid.x * grid.y * grid.z;
        const int nthreads = block.x * block.y * block.z;
        std::vector<unsigned> order(nblocks);
        for (unsigned i = 0; i < nblocks; i++) order[i] = i;
        std::uint64_t state = seed;                         // Fisher-Yates with splitmix64
        for (unsigned i = nblocks; i > 1; i--) {
            std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
            std::swap(order[i - 1], order[(z ^ (z >> 31)) % i]);
        }
        Block b(nthreads, order);
        g_block = &b;
        Block::poison_shared();

        bool finished = false;
        std::mutex finished_mu;
        std::condition_variable finished_cv;
        std::thread watchdog([&] {
            std::uint64_t seen = b.progress.load();
            auto last = std::chrono::steady_clock::now();
            for (;;) {
                {
                    std::unique_lock<std::mutex> g(finished_mu);
                    if (finished_cv.wait_for(g, std::chrono::milliseconds(50), [&] { return finished; })) return;
                }
                const std::uint64_t now = b.progress.load();
                if (now != seen) { seen = now; last = std::chrono::steady_clock::now(); continue; }
                if (std::chrono::duration<double>(std::chrono::steady_clock::now() - last).count() > watchdog_s) {
                    std::lock_guard<std::mutex> g(b.mu);
                    fail("no progress for " + std::to_string((int)watchdog_s) + " s in " + b.block_name() +
                         " (an endless loop, or a wait that never ends)" + b.report());
                }
            }
        });
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; t++) {
            threads.emplace_back([&, t] {
                t_tid = t;
                t_thread_idx = uint3{t % block.x, t / block.x % block.y, t / block.x / block.y};
                for (std::size_t k = 0; k < nblocks; k++) {
                    const unsigned lin = order[k];     // b.next == k here: every thread left block k-1
                    t_block_idx = uint3{lin % grid.x, lin / grid.x % grid.y, lin / grid.x / grid.y};
                    call_kernel();
                    b.finish_thread();
                }
            });
        }
        for (auto& th : threads) th.join();
        {
            std::lock_guard<std::mutex> g(finished_mu);
            finished = true;
        }
        finished_cv.notify_one();
        watchdog.join();
        g_block = nullptr;
    }

    int finish() {
        std::fflush(stdout);                       // a kernel's printf went to stderr (see Launch())
        for (std::size_t r = 0; r < regions.size(); r++) {
            for (std::size_t done = 0; done < sizes[r];) {
                const ssize_t n = ::write(data_fd, regions[r] + done, sizes[r] - done);
                if (n <= 0) fail("short write of array data");
                done += n;
            }
            std::free(regions[r]);
        }
        return 0;
    }
};


Launch* g_launch = nullptr;

void* arg_ptr(int i) {
    unsigned r = 0;
    unsigned long long off = 0;
    const std::string& a = g_launch->word(i);
    if (std::sscanf(a.c_str(), "r%u+%llu", &r, &off) != 2 || r >= g_launch->regions.size())
        fail("argument " + std::to_string(i) + " is not a region pointer: " + a);
    return g_launch->regions[r] + off;
}

std::uint64_t arg_bits(int i) { return std::strtoull(g_launch->word(i).c_str(), nullptr, 16); }

}  // namespace cuda_emu

void __trap() { cuda_emu::fail("__trap() called in " + cuda_emu::g_block->block_name()); }

int main(int argc, char** argv) {
    cuda_emu::Launch launch(argc, argv);
    cuda_emu::g_launch = &launch;
    launch.run();
    return launch.finish();
}
