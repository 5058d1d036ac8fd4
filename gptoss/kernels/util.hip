// Helpers that are not model math. spin_wait keeps the GPU busy for a number of clock cycles: a
// profiler launches it first so that every following launch is queued before the GPU reaches it, and
// the CUDA events between launches then time the kernels alone, not the host's launch gaps.
#include "common.h"

extern "C" __global__ void spin_wait(long long cycles) {
    GPTOSS_WAIT_PRIOR_GRID();
    GPTOSS_LAUNCH_DEPENDENTS();
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
