// Runs lib/gpu/kernels.cu on the CPU, one OS thread per CUDA thread (blocks one after another,
// real barriers for __syncthreads and warp shuffles), and checks every kernel against a plain
// reference on generated pairs. Checks the kernels' logic where no GPU exists; the GPU tests
// (tests/gpu.rs) check the real thing. Build and run: scripts/check_kernels.sh.
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
static uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
static std::barrier<>* block_bar;
static std::barrier<>* warp_bar[32];
static unsigned xbuf[32][32];
static void __syncthreads() { block_bar->arrive_and_wait(); }
static unsigned shfl(unsigned v, int src_lane_delta, bool down) {
    unsigned w = threadIdx.x >> 5, l = threadIdx.x & 31;
    xbuf[w][l] = v;
    warp_bar[w]->arrive_and_wait();
    int s = down ? (int)l + src_lane_delta : (int)l - src_lane_delta;
    unsigned r = (s >= 0 && s < 32) ? xbuf[w][s] : v;
    warp_bar[w]->arrive_and_wait();
    return r;
}
static unsigned __shfl_down_sync(unsigned, unsigned v, int d) { return shfl(v, d, true); }
static unsigned __shfl_up_sync(unsigned, unsigned v, int d) { return shfl(v, d, false); }
static int __popc(unsigned x) { return __builtin_popcount(x); }
static int __ffs(unsigned x) { return __builtin_ffs((int)x); }
static unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return std::atomic_ref<unsigned long long>(*p).fetch_add(v); }
static unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#include "../lib/gpu/kernels.cu"

static void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; b++) {
        std::barrier<> bb(block);
        block_bar = &bb;
        for (unsigned w = 0; w < block / 32; w++) warp_bar[w] = new std::barrier<>(32);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; t++) ts.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = b; body(); });
        for (auto& t : ts) t.join();
        for (unsigned w = 0; w < block / 32; w++) delete warp_bar[w];
    }
}

static unsigned long long rng = 88172645463325252ull;
static unsigned long long next() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static int failures = 0;
#define CHECK(c, ...) do { if (!(c)) { failures++; std::printf("FAIL: " __VA_ARGS__); std::printf("\n"); } } while (0)

int main() {
    const size_t lens[] = {1, 15, 16, 17, 4095, 4096, 4097, 3 * 4096 + 5, 70000};
    const int per_mille[] = {0, 1000, 10, 300};
    for (size_t n : lens) for (int pm : per_mille) {
        size_t cap = (n + 16) & ~size_t(15);
        u8* a = (u8*)std::aligned_alloc(16, cap); u8* b = (u8*)std::aligned_alloc(16, cap); u8* out = (u8*)std::aligned_alloc(16, cap);
        for (size_t i = 0; i < n; i++) { a[i] = (u8)next(); b[i] = (int)(next() % 1000) < pm ? (u8)(a[i] ^ (1 + next() % 255)) : a[i]; }
        std::vector<u32> ref_pos; std::vector<u8> ref_val;
        for (size_t i = 0; i < n; i++) if (a[i] != b[i]) { ref_pos.push_back(1000000 + (u32)i); ref_val.push_back(b[i]); }
        unsigned tiles = (unsigned)((n + TILE_BYTES - 1) / TILE_BYTES);
        // xor_count
        u64 count = 0;
        std::memset(out, 0xee, cap);
        launch(tiles, TILE_THREADS, [&] { xor_count(a, b, out, n, &count); });
        bool same = true;
        for (size_t i = 0; i < n; i++) same &= out[i] == (u8)(a[i] ^ b[i]);
        CHECK(same, "xor bytes n=%zu pm=%d", n, pm);
        CHECK(out[n] == 0xee, "xor wrote past the end n=%zu", n);
        CHECK(count == ref_pos.size(), "xor count %llu != %zu n=%zu pm=%d", count, ref_pos.size(), n, pm);
        // overwrite: tile_count, tile_scan, scatter
        std::vector<u32> tc(tiles), pos(n + 1, 0xdeadbeef); std::vector<u8> val(n + 1, 0xee);
        u64 total = 0;
        launch(tiles, TILE_THREADS, [&] { tile_count(a, b, n, tc.data()); });
        launch(1, 1024, [&] { tile_scan(tc.data(), tiles, &total); });
        launch(tiles, TILE_THREADS, [&] { scatter(a, b, n, tc.data(), 1000000u, pos.data(), val.data()); });
        CHECK(total == ref_pos.size(), "overwrite total %llu != %zu n=%zu pm=%d", total, ref_pos.size(), n, pm);
        CHECK(std::equal(ref_pos.begin(), ref_pos.end(), pos.begin()), "positions n=%zu pm=%d", n, pm);
        CHECK(std::equal(ref_val.begin(), ref_val.end(), val.begin()), "values n=%zu pm=%d", n, pm);
        CHECK(pos[ref_pos.size()] == 0xdeadbeef && val[ref_val.size()] == 0xee, "scatter wrote past the count n=%zu", n);
        std::free(a); std::free(b); std::free(out);
    }
    // tile_scan with more tiles than threads (a full 8 MiB chunk has 2048 tiles).
    for (unsigned nt : {1u, 1023u, 1024u, 1025u, 2048u, 5000u}) {
        std::vector<u32> c(nt), want(nt);
        u64 total = 0, run = 0;
        for (unsigned t = 0; t < nt; t++) { c[t] = (u32)(next() % 4097); want[t] = (u32)run; run += c[t]; }
        launch(1, 1024, [&] { tile_scan(c.data(), nt, &total); });
        CHECK(c == want && total == run, "tile_scan ntiles=%u", nt);
    }
    std::printf("%s: kernels.cu emulated on the CPU, %d failure(s)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
