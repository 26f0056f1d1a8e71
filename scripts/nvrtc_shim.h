// What NVRTC predefines for lib/gpu/kernels.cu, spelled with clang's NVPTX builtins, so that
// scripts/check_kernels.sh can compile the kernels to PTX with clang and no CUDA toolkit.
#include <__clang_cuda_builtin_vars.h>
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
__device__ static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { uint4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
__device__ static inline unsigned int __shfl_down_sync(unsigned int m, unsigned int v, int d) { return (unsigned int)__nvvm_shfl_sync_down_i32(m, (int)v, d, 0x1f); }
__device__ static inline unsigned int __shfl_up_sync(unsigned int m, unsigned int v, int d) { return (unsigned int)__nvvm_shfl_sync_up_i32(m, (int)v, d, 0); }
__device__ static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
__device__ static inline int __ffs(unsigned int x) { return __builtin_ffs((int)x); }
__device__ static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return (unsigned long long)__nvvm_atom_add_gen_ll((long long*)p, (long long)v); }
__device__ static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
