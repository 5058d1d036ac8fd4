// NVIDIA tensor-core building blocks (sm_80+; used on sm_90): bf16 mma.sync, ldmatrix and cp.async in
// inline PTX. Include after common.h and use only inside `#if GPTOSS_HAS_MMA` blocks; AMD builds see
// an empty header and take the portable paths.
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (g = lane / 4, t = lane % 4):
//   A (16x16, row-major):  a[0] = A[g][2t..2t+1],   a[1] = A[g+8][2t..2t+1],
//                          a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, "col": stored as B^T rows, i.e. W[n][k]): b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C/D (16x8, f32):       c[0..1] = C[g][2t..2t+1],  c[2..3] = C[g+8][2t..2t+1]
// Each 32-bit register holds two bf16, the lower k (or column) index in the low half.
#pragma once

#if GPTOSS_HAS_MMA

// D = A * B + D for one 16x8x16 tile.
DEVICE void mma_bf16_16816(float d[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

DEVICE u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i; r[i] is matrix i's fragment.
DEVICE void ldmatrix_x4(u32 r[4], const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(smem_row)));
}

DEVICE void ldmatrix_x2(u32 r[2], const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(smem_row)));
}

// Transposed load: for operands stored k-major (e.g. V[key][dim] used as B with k = key).
DEVICE void ldmatrix_x4_trans(u32 r[4], const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(smem_row)));
}

DEVICE void ldmatrix_x2_trans(u32 r[2], const void* smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(smem_row)));
}

// 16-byte global -> shared copy that bypasses registers; src_bytes < 16 zero-fills the rest
// (src_bytes = 0 writes 16 zero bytes: use it for out-of-range rows, with any valid src address).
DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_u32(smem_dst)), "l"(gmem_src), "r"(src_bytes));
}

DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups are still in flight.
template <int N>
DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

#endif  // GPTOSS_HAS_MMA
