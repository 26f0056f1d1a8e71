// Diff kernels for lib/gpu (docs/GPU.md). Embedded in the binary with include_str! and
// compiled at run time by NVRTC, so no CUDA toolkit is needed to build; no #include.
//
// Every kernel works on one chunk of n bytes (n <= the pipeline's chunk size), whose device
// pointers are 16-byte aligned. A thread owns 16 consecutive bytes; a tile is the 4096 bytes
// of one 256-thread block. The tail beyond n reads as zero in both inputs, so it never counts
// as changed.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define TILE_THREADS 256
#define TILE_BYTES (TILE_THREADS * 16)
#define FULL_MASK 0xffffffffu

// 0x80 in every byte lane of w that is nonzero, 0 elsewhere.
__device__ __forceinline__ u32 nonzero_lanes(u32 w) {
    return (((w & 0x7f7f7f7fu) + 0x7f7f7f7fu) | w) & 0x80808080u;
}

// The 16 bytes at p[i..i+16) as four little-endian words; bytes at or past n read as 0.
__device__ __forceinline__ void load16(const u8* __restrict__ p, u64 i, u64 n, u32 w[4]) {
    if (i + 16 <= n) {
        uint4 v = *reinterpret_cast<const uint4*>(p + i);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else {
        w[0] = 0; w[1] = 0; w[2] = 0; w[3] = 0;
        for (u64 j = i; j < n; j++) {
            u32 k = (u32)(j - i);
            w[k >> 2] |= (u32)p[j] << (8 * (k & 3));
        }
    }
}

// Sum of v over the block; the result is valid in thread 0. blockDim.x is a multiple of 32.
__device__ __forceinline__ u32 block_sum(u32 v) {
    __shared__ u32 warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    u32 nwarps = blockDim.x >> 5;
    v = threadIdx.x < nwarps ? warp_sums[threadIdx.x] : 0;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    }
    return v;
}

// Exclusive prefix sum of v over the block, in thread order. Every thread must call it.
__device__ __forceinline__ u32 block_exclusive_scan(u32 v) {
    __shared__ u32 warp_base[32];
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        u32 t = __shfl_up_sync(FULL_MASK, inc, o);
        if (lane >= (u32)o) inc += t;
    }
    if (lane == 31) warp_base[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u32 nwarps = blockDim.x >> 5;
        u32 t = lane < nwarps ? warp_base[lane] : 0;
        u32 ti = t;
        for (int o = 1; o < 32; o <<= 1) {
            u32 u = __shfl_up_sync(FULL_MASK, ti, o);
            if (lane >= (u32)o) ti += u;
        }
        if (lane < nwarps) warp_base[lane] = ti - t;
    }
    __syncthreads();
    return warp_base[warp] + inc - v;
}

// xor: out = a ^ b, and *count += number of nonzero bytes of out (one atomic per block).
extern "C" __global__ void xor_count(const u8* __restrict__ a, const u8* __restrict__ b, u8* __restrict__ out, u64 n, u64* __restrict__ count) {
    u32 changed = 0;
    u64 stride = (u64)gridDim.x * blockDim.x * 16;
    for (u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * 16; i < n; i += stride) {
        u32 x[4], y[4], z[4];
        load16(a, i, n, x);
        load16(b, i, n, y);
        for (int k = 0; k < 4; k++) {
            z[k] = x[k] ^ y[k];
            changed += __popc(nonzero_lanes(z[k]));
        }
        if (i + 16 <= n) {
            *reinterpret_cast<uint4*>(out + i) = make_uint4(z[0], z[1], z[2], z[3]);
        } else {
            for (u64 j = i; j < n; j++) {
                u32 k = (u32)(j - i);
                out[j] = (u8)(z[k >> 2] >> (8 * (k & 3)));
            }
        }
    }
    changed = block_sum(changed);
    if (threadIdx.x == 0 && changed != 0) atomicAdd(count, (u64)changed);
}

// overwrite, step 1: tile_counts[t] = changed bytes in tile t. One block per tile.
extern "C" __global__ void tile_count(const u8* __restrict__ a, const u8* __restrict__ b, u64 n, u32* __restrict__ tile_counts) {
    u64 i = (u64)blockIdx.x * TILE_BYTES + (u64)threadIdx.x * 16;
    u32 c = 0;
    if (i < n) {
        u32 x[4], y[4];
        load16(a, i, n, x);
        load16(b, i, n, y);
        for (int k = 0; k < 4; k++) c += __popc(nonzero_lanes(x[k] ^ y[k]));
    }
    c = block_sum(c);
    if (threadIdx.x == 0) tile_counts[blockIdx.x] = c;
}

// overwrite, step 2: exclusive prefix sum of tile_counts in place, *total = the sum.
// One block; each thread scans a contiguous run of tiles.
extern "C" __global__ void tile_scan(u32* __restrict__ tile_counts, u32 ntiles, u64* __restrict__ total) {
    u32 per = (ntiles + blockDim.x - 1) / blockDim.x;
    u32 lo = min(threadIdx.x * per, ntiles);
    u32 hi = min(lo + per, ntiles);
    u32 s = 0;
    for (u32 t = lo; t < hi; t++) s += tile_counts[t];
    u32 run = block_exclusive_scan(s);
    for (u32 t = lo; t < hi; t++) {
        u32 c = tile_counts[t];
        tile_counts[t] = run;
        run += c;
    }
    if (threadIdx.x == blockDim.x - 1) *total = (u64)run;
}

// overwrite, step 3: write the changed positions (base + offset in chunk) and the new byte
// values, ascending, at tile_offsets[tile] + the thread's prefix within the tile.
extern "C" __global__ void scatter(const u8* __restrict__ a, const u8* __restrict__ b, u64 n, const u32* __restrict__ tile_offsets, u32 base, u32* __restrict__ positions, u8* __restrict__ values) {
    u64 i = (u64)blockIdx.x * TILE_BYTES + (u64)threadIdx.x * 16;
    u32 y[4] = {0, 0, 0, 0}, m[4] = {0, 0, 0, 0};
    u32 c = 0;
    if (i < n) {
        u32 x[4];
        load16(a, i, n, x);
        load16(b, i, n, y);
        for (int k = 0; k < 4; k++) {
            m[k] = nonzero_lanes(x[k] ^ y[k]);
            c += __popc(m[k]);
        }
    }
    u32 off = tile_offsets[blockIdx.x] + block_exclusive_scan(c);
    for (int k = 0; k < 4; k++) {
        u32 mk = m[k];
        while (mk != 0) {
            u32 lane = (u32)(__ffs(mk) - 1) >> 3;
            positions[off] = base + (u32)i + 4 * k + lane;
            values[off] = (u8)(y[k] >> (8 * lane));
            off++;
            mk &= mk - 1;
        }
    }
}
