"""In-register helpers shared by the kernels, and small host-side utilities.

Packed tiles are loaded at their packed shape ([BLOCK_K * bits / 32, BLOCK_N] int32 words) and
expanded to codes in registers: a word row holds ``32 // width`` consecutive K rows, so a
broadcast shift over a middle axis followed by a reshape puts code ``k`` at row ``k``. The 3-bit
format is two planes (2-bit low, 1-bit high), each expanded this way and OR-ed together.

Dequantisation is one FMA per weight: ``w = q * s + z'`` with ``z' = -z * s`` computed once per
scale row (NF4: ``w = codebook[q] * absmax``, the 16-entry codebook gathered from an L1-resident
table). Every value is float32 before arithmetic, whatever the storage dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Shared memory per block (opt-in maximum) on the architectures we ship configs for.
SHARED_LIMIT = {80: 166912, 90: 232448}


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def unpack_plane(words, WIDTH: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 words [ROWS * WIDTH / 32, BLOCK_N] -> int32 codes [ROWS, BLOCK_N] of WIDTH bits."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    shifts = tl.arange(0, PER_WORD) * WIDTH
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (ROWS, BLOCK_N))


@triton.jit
def load_codes(q_ptr, k0, offs_n, mask_n, stride_qk, stride_qn, KP,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] (int32) of K rows ``k0 .. k0 + BLOCK_K`` (k0 a multiple of 32).

    Rows at or past ``KP`` (the padded K) read as code 0.
    """
    if BITS == 3:
        ROWS_LO: tl.constexpr = BLOCK_K // 16
        ROWS_HI: tl.constexpr = BLOCK_K // 32
        r_lo = k0 // 16 + tl.arange(0, ROWS_LO)
        lo = tl.load(q_ptr + r_lo[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                     mask=(r_lo[:, None] < KP // 16) & mask_n[None, :], other=0)
        r_hi = k0 // 32 + tl.arange(0, ROWS_HI)
        hi = tl.load(q_ptr + (KP // 16 + r_hi[:, None]) * stride_qk + offs_n[None, :] * stride_qn,
                     mask=(r_hi[:, None] < KP // 32) & mask_n[None, :], other=0)
        codes = unpack_plane(lo, 2, BLOCK_K, BLOCK_N) | (unpack_plane(hi, 1, BLOCK_K, BLOCK_N) << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        ROWS: tl.constexpr = BLOCK_K // PER_WORD
        r = k0 // PER_WORD + tl.arange(0, ROWS)
        words = tl.load(q_ptr + r[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=(r[:, None] < KP // PER_WORD) & mask_n[None, :], other=0)
        codes = unpack_plane(words, BITS, BLOCK_K, BLOCK_N)
    return codes


@triton.jit
def load_group_params(scales_ptr, zeros_ptr, g, offs_n, mask_n, stride_sg, stride_sn, NF4: tl.constexpr):
    """(scale, z') float32 [BLOCK_N] of scale row ``g``, with z' = -zero * scale (0 for NF4)."""
    s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    if NF4:
        zs = tl.zeros_like(s)
    else:
        z = tl.load(zeros_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        zs = -z * s
    return s, zs


@triton.jit
def dequant_tile(codes, s, zs, codebook_ptr, NF4: tl.constexpr):
    """float32 W^T tile [BLOCK_K, BLOCK_N] from codes and one scale row: q*s + z' (NF4: cb[q]*s)."""
    if NF4:
        w = nf4_levels(codes, codebook_ptr) * s[None, :]
    else:
        w = codes.to(tl.float32) * s[None, :] + zs[None, :]
    return w


@triton.jit
def expanded_codes(q_ptr, k0, offs_n, mask_n, KP, stride_qk, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """(codes, kk) of K rows ``k0 .. k0 + BLOCK_K`` with every packed word loaded once, expanded
    over an extra axis instead of reshaped (no layout change, so the tile stays coalesced along N).

    2/4-bit: codes int32 [BLOCK_K / PW, PW, BLOCK_N] with code k = k0 + PW·r + j at [r, j, :].
    3-bit: [BLOCK_K / 32, 2, 16, BLOCK_N] with k = k0 + 32a + 16b + c (low 2 bits in plane word
    k // 16 at bit 2c, high bit in word k // 32 at bit 16b + c). ``kk`` holds k with a size-1 N axis.
    Rows at or past ``KP`` read as code 0.
    """
    if BITS == 3:
        a = tl.arange(0, BLOCK_K // 32)[:, None, None, None]
        b = tl.arange(0, 2)[None, :, None, None]
        c = tl.arange(0, 16)[None, None, :, None]
        n_ = offs_n[None, None, None, :]
        mn = mask_n[None, None, None, :]
        r_lo = k0 // 16 + 2 * a + b
        lo = tl.load(q_ptr + r_lo * stride_qk + n_ * stride_qn, mask=(r_lo < KP // 16) & mn, other=0)
        # the 1-bit plane word is loaded at the 2-bit plane's shape (once per half b, an L1 hit the
        # second time): both loads then get one layout, so only packed words ever change layout,
        # never the expanded tile
        r_hi = k0 // 32 + a + 0 * b
        hi = tl.load(q_ptr + (KP // 16 + r_hi) * stride_qk + n_ * stride_qn, mask=(r_hi < KP // 32) & mn, other=0)
        codes = ((lo >> (2 * c)) & 3) | (((hi >> (16 * b + c)) & 1) << 2)
        kk = k0 + 32 * a + 16 * b + c
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        r = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)[:, None, None]
        j = tl.arange(0, PER_WORD)[None, :, None]
        words = tl.load(q_ptr + r * stride_qk + offs_n[None, None, :] * stride_qn,
                        mask=(r < KP // PER_WORD) & mask_n[None, None, :], other=0)
        codes = (words >> (j * BITS)) & ((1 << BITS) - 1)
        kk = r * PER_WORD + j
    return codes, kk


@triton.jit
def load_words(q_ptr, k0, k_stop, offs_n, mask_n, KP, stride_qk, stride_qn, BITS: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The packed words of K rows ``k0 .. k0 + BLOCK_K`` at their packed shape, each loaded once, with
    size-1 code axes so that :func:`expand_words` broadcasts them without a layout change.

    2/4-bit: (words [BLOCK_K / PW, 1, BLOCK_N], the same again). 3-bit: (2-bit plane words
    [BLOCK_K / 32, 2, 1, BLOCK_N], 1-bit plane words at the same shape). K rows at or past
    ``k_stop`` (a multiple of 32, at most the padded K ``KP``) and columns off ``mask_n`` read as 0
    and cost no memory traffic.
    """
    if BITS == 3:
        a = tl.arange(0, BLOCK_K // 32)[:, None, None, None]
        b = tl.arange(0, 2)[None, :, None, None]
        n_ = offs_n[None, None, None, :]
        mn = mask_n[None, None, None, :]
        r_lo = k0 // 16 + 2 * a + b
        lo = tl.load(q_ptr + r_lo * stride_qk + n_ * stride_qn, mask=(r_lo < k_stop // 16) & mn, other=0)
        r_hi = k0 // 32 + a + 0 * b  # at the 2-bit plane's shape: one layout for both (see expanded_codes)
        hi = tl.load(q_ptr + (KP // 16 + r_hi) * stride_qk + n_ * stride_qn, mask=(r_hi < k_stop // 32) & mn,
                     other=0)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        r = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)[:, None, None]
        lo = tl.load(q_ptr + r * stride_qk + offs_n[None, None, :] * stride_qn,
                     mask=(r < k_stop // PER_WORD) & mask_n[None, None, :], other=0)
        hi = lo
    return lo, hi


@triton.jit
def expand_words(lo, hi, BITS: tl.constexpr):
    """int32 codes of :func:`load_words`' words, expanded over the code axes (see :func:`tile_rows`)."""
    if BITS == 3:
        b = tl.arange(0, 2)[None, :, None, None]
        c = tl.arange(0, 16)[None, None, :, None]
        codes = ((lo >> (2 * c)) & 3) | (((hi >> (16 * b + c)) & 1) << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        j = tl.arange(0, PER_WORD)[None, :, None]
        codes = (lo >> (j * BITS)) & ((1 << BITS) - 1)
    return codes


@triton.jit
def tile_rows(BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """K offset (0 .. BLOCK_K) of each position of :func:`expand_words`' codes, with a size-1 N axis:
    2/4-bit [BLOCK_K / PW, PW, 1] (k = PW·r + j), 3-bit [BLOCK_K / 32, 2, 16, 1] (k = 32a + 16b + c)."""
    if BITS == 3:
        a = tl.arange(0, BLOCK_K // 32)[:, None, None, None]
        b = tl.arange(0, 2)[None, :, None, None]
        c = tl.arange(0, 16)[None, None, :, None]
        kk = 32 * a + 16 * b + c
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        kk = PER_WORD * tl.arange(0, BLOCK_K // PER_WORD)[:, None, None] + tl.arange(0, PER_WORD)[None, :, None]
    return kk


@triton.jit
def along_n(v, BITS: tl.constexpr):
    """A [BLOCK_N] vector broadcastable against :func:`expanded_codes`' tiles."""
    if BITS == 3:
        out = v[None, None, None, :]
    else:
        out = v[None, None, :]
    return out


@triton.jit
def sum_over_k(t, BITS: tl.constexpr):
    """Sum an expanded tile over its K axes -> [BLOCK_N]."""
    out = tl.sum(tl.sum(t, axis=0), axis=0)
    if BITS == 3:
        out = tl.sum(out, axis=0)
    return out


@triton.jit
def _pick(bit, codebook_ptr, i: tl.constexpr):
    """codebook[i + 1] where ``bit`` is set, else codebook[i] (two uniform scalar loads, hoisted)."""
    return tl.where(bit, tl.load(codebook_ptr + i + 1), tl.load(codebook_ptr + i))


@triton.jit
def nf4_levels(codes, codebook_ptr):
    """float32 codebook[codes] for 4-bit codes from the 16 levels held in registers: a select tree
    over the code's bits (15 selects). A gather ``tl.load(codebook_ptr + codes)`` has no contiguity,
    so Triton gives it its own layout and round-trips the whole tile through shared memory."""
    b0 = (codes & 1) != 0
    v0 = _pick(b0, codebook_ptr, 0)
    v1 = _pick(b0, codebook_ptr, 2)
    v2 = _pick(b0, codebook_ptr, 4)
    v3 = _pick(b0, codebook_ptr, 6)
    v4 = _pick(b0, codebook_ptr, 8)
    v5 = _pick(b0, codebook_ptr, 10)
    v6 = _pick(b0, codebook_ptr, 12)
    v7 = _pick(b0, codebook_ptr, 14)
    b1 = (codes & 2) != 0
    u0 = tl.where(b1, v1, v0)
    u1 = tl.where(b1, v3, v2)
    u2 = tl.where(b1, v5, v4)
    u3 = tl.where(b1, v7, v6)
    b2 = (codes & 4) != 0
    t0 = tl.where(b2, u1, u0)
    t1 = tl.where(b2, u3, u2)
    return tl.where((codes & 8) != 0, t1, t0)


@triton.jit
def codes_to_float(codes, codebook_ptr, NF4: tl.constexpr):
    """float32 codes (NF4: the codebook levels, :func:`nf4_levels`). Integer codes use the 2^23
    trick: OR-ing the exponent bits of 2^23 and subtracting 2^23 is one logic op and one add, no
    int->float convert."""
    if NF4:
        v = nf4_levels(codes, codebook_ptr)
    else:
        v = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return v


@triton.jit
def load_wt_tile(q_ptr, scales_ptr, zeros_ptr, codebook_ptr, k0, offs_n, mask_n, KP, group_size, num_groups,
                 stride_qk, stride_qn, stride_sg, stride_sn,
                 BITS: tl.constexpr, NF4: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dequantized float32 W^T tile [BLOCK_K, BLOCK_N] (K rows k0.., N columns offs_n).

    Requires BLOCK_K to divide the group size (or a single group), so one scale row serves the tile.
    """
    codes = load_codes(q_ptr, k0, offs_n, mask_n, stride_qk, stride_qn, KP, BITS, BLOCK_K, BLOCK_N)
    g = tl.minimum(k0 // group_size, num_groups - 1)
    s, zs = load_group_params(scales_ptr, zeros_ptr, g, offs_n, mask_n, stride_sg, stride_sn, NF4)
    return dequant_tile(codes, s, zs, codebook_ptr, NF4)


@triton.jit
def swizzle_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped program order (GROUP_M row tiles share a band of column tiles, for L2 reuse)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def lora_up(acc, s_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
            R_PAD: tl.constexpr, USE_DOT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + scaling * S[offs_m, :R] @ B[offs_n, :R]^T, in float32."""
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=(offs_m[:, None] < M) & mask_r[None, :], other=0.0).to(tl.float32)
    bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                 mask=mask_r[:, None] & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    if USE_DOT:
        up = tl.dot(s, bt, input_precision="ieee")
    else:  # BLOCK_M == 1
        up = tl.sum(tl.trans(s) * bt, axis=0)[None, :]
    return acc + scaling * up


# ---------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------
def r_pad(rank: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot's minimum inner size)."""
    return max(16, triton.next_power_of_2(int(rank)))


def m_bucket(m: int) -> int:
    """Autotuning key for a row count: the next power of two, so varying batch sizes share a tuning."""
    return triton.next_power_of_2(max(int(m), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 activations, else tensor-core 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"


def shared_limit(device) -> int:
    """Opt-in shared memory per block of ``device`` (A100's when unknown)."""
    if isinstance(device, torch.device) and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", SHARED_LIMIT[80]))
    return SHARED_LIMIT[80]


def packed_bytes_per_k(bits: int) -> float:
    return bits / 8.0


_CODEBOOKS: dict = {}


def codebook_on(device) -> torch.Tensor:
    """The NF4 codebook (float32 [16]) on ``device``, cached."""
    from ..formats import NF4_CODEBOOK

    key = str(device)
    if key not in _CODEBOOKS:
        _CODEBOOKS[key] = NF4_CODEBOOK.to(device)
    return _CODEBOOKS[key]
