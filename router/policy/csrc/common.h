/* Shared by the parts of router/policy/_fastpath.c (one translation unit). */
#ifndef LLMFLEET_FASTPATH_COMMON_H
#define LLMFLEET_FASTPATH_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* splitmix64's finaliser: spreads a structured 64-bit hash over all 64 bits. */
static inline uint64_t
mix64_value(uint64_t value)
{
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9ULL;
    value = (value ^ (value >> 27)) * 0x94D049BB133111EBULL;
    return value ^ (value >> 31);
}

/* The multilinear value of one block: sum_w word[w] * mult[w] (mod 2^64), word[w] the
 * little-endian uint64 made of tokens 2w and 2w + 1 (int32 LE). */
static inline uint64_t
block_value(const unsigned char *src, const uint64_t *mult, Py_ssize_t words)
{
    if (words == 8) { /* 16-token blocks: the usual case, unrolled */
        uint64_t w[8];
        memcpy(w, src, 64); /* unaligned-safe; little-endian only (hashing.py checks) */
        return w[0] * mult[0] + w[1] * mult[1] + w[2] * mult[2] + w[3] * mult[3]
             + w[4] * mult[4] + w[5] * mult[5] + w[6] * mult[6] + w[7] * mult[7];
    }
    uint64_t value = 0;
    for (Py_ssize_t w = 0; w < words; w++, src += 8) {
        uint64_t word;
        memcpy(&word, src, 8);
        value += word * mult[w];
    }
    return value;
}

/* dst[k] = running + sum_{j<=k} (block_value(block j) ^ salt[j]) for k < blocks. */
static inline void
hash_blocks(const unsigned char *src, const uint64_t *mult, Py_ssize_t words,
            const uint64_t *salt, uint64_t *dst, Py_ssize_t blocks, uint64_t running)
{
    for (Py_ssize_t k = 0; k < blocks; k++, src += 8 * words) {
        running += block_value(src, mult, words) ^ salt[k];
        dst[k] = running;
    }
}

#endif
