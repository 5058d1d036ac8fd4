"""One-off device check: NVRTC compiles our headers through cupy.RawModule, mma.sync gives the right
product, graph capture works with preallocated buffers. Prints a short report."""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
import cupy
from gptoss.weights.bf16 import to_bf16_bits, from_bf16_bits

SRC = r'''
#include "common.h"
#include "mma.h"
extern "C" __global__ void mma16(const bf16_t* A, const bf16_t* W, float* C) {
  // A [16,16] row-major, W [8,16] row-major (B^T), C [16,8]
  __shared__ __align__(16) bf16_t sa[16*16];
  __shared__ __align__(16) bf16_t sw[8*16];
  int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) sa[i] = A[i];
  for (int i = lane; i < 128; i += 32) sw[i] = W[i];
  __syncthreads();
#if GPTOSS_HAS_MMA
  u32 a[4], b[2]; float d[4] = {0, 0, 0, 0};
  ldmatrix_x4(a, &sa[(lane % 16) * 16 + (lane / 16) * 8]);
  ldmatrix_x2(b, &sw[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
  mma_bf16_16816(d, a, b);
  int g = lane / 4, t = lane % 4;
  C[g * 8 + 2 * t] = d[0]; C[g * 8 + 2 * t + 1] = d[1];
  C[(g + 8) * 8 + 2 * t] = d[2]; C[(g + 8) * 8 + 2 * t + 1] = d[3];
#endif
}
extern "C" __global__ void rnd(float* out, unsigned seed) {
  int i = threadIdx.x; out[i] = sample_uniform(seed, i, 3) + fp4_e2m1_to_float(i & 15) * 0 ;
}
'''
from gptoss.kernels import KERNEL_DIR
import re
def expand(text):
    return re.sub(r'#include "(\w+\.h)"', lambda m: (KERNEL_DIR / m.group(1)).read_text(), text)
t0 = time.time()
mod = cupy.RawModule(code=expand(SRC), options=("-std=c++17",))
f = mod.get_function("mma16")
print("compile s", round(time.time() - t0, 2))
rng = np.random.default_rng(0)
A = rng.standard_normal((16, 16)).astype(np.float32); W = rng.standard_normal((8, 16)).astype(np.float32)
a, w = to_bf16_bits(A), to_bf16_bits(W)
C = cupy.full((16, 8), np.nan, dtype=cupy.float32)
f((1,), (32,), (cupy.asarray(a), cupy.asarray(w), C))
ref = from_bf16_bits(a).astype(np.float64) @ from_bf16_bits(w).astype(np.float64).T
print("mma max err", float(np.abs(cupy.asnumpy(C) - ref).max()))
# copy bandwidth
x = cupy.empty(2 << 30 >> 2, dtype=cupy.float32); y = cupy.empty_like(x); x.fill(1)
s, e = cupy.cuda.Event(), cupy.cuda.Event()
for _ in range(3): y[...] = x
s.record();
for _ in range(10): cupy.copyto(y, x)
e.record(); e.synchronize(); ms = cupy.cuda.get_elapsed_time(s, e) / 10
print("copy GB/s (r+w)", round(2 * x.nbytes / ms / 1e6))
# graph capture of a RawKernel with preallocated buffers
g_out = cupy.empty(32, dtype=cupy.float32); r = mod.get_function("rnd")
st = cupy.cuda.Stream(non_blocking=True)
with st:
    st.begin_capture(); r((1,), (32,), (g_out, np.uint32(7))); graph = st.end_capture()
    graph.launch(st); st.synchronize()
print("graph ok", cupy.asnumpy(g_out)[:3])
free, total = cupy.cuda.runtime.memGetInfo()
print("mem free/total GiB", free / 2**30, total / 2**30, cupy.cuda.runtime.getDeviceProperties(0)["name"])
