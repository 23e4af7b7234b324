/* XXH64, written from its published specification (Yann Collet's xxHash, BSD-2-Clause
 * algorithm): ring keys whose length is not a whole number of hash blocks are xxh64 of the
 * tokens' int32 little-endian bytes, the same values the Python xxhash package gives
 * (tests/routing/test_fastpath.py checks every length up to a few blocks). */
#ifndef LLMFLEET_FASTPATH_XXH64_H
#define LLMFLEET_FASTPATH_XXH64_H

#include "common.h"

#define XXH_PRIME64_1 0x9E3779B185EBCA87ULL
#define XXH_PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define XXH_PRIME64_3 0x165667B19E3779F9ULL
#define XXH_PRIME64_4 0x85EBCA77C2B2AE63ULL
#define XXH_PRIME64_5 0x27D4EB2F165667C5ULL

static inline uint64_t
xxh_rotl64(uint64_t value, int bits)
{
    return (value << bits) | (value >> (64 - bits));
}

static inline uint64_t
xxh_read64(const unsigned char *p)
{
    uint64_t value;
    memcpy(&value, p, 8); /* little-endian hosts only (hashing.py checks) */
    return value;
}

static inline uint32_t
xxh_read32(const unsigned char *p)
{
    uint32_t value;
    memcpy(&value, p, 4);
    return value;
}

static inline uint64_t
xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * XXH_PRIME64_2;
    acc = xxh_rotl64(acc, 31);
    return acc * XXH_PRIME64_1;
}

static inline uint64_t
xxh_merge_round(uint64_t acc, uint64_t value)
{
    acc ^= xxh_round(0, value);
    return acc * XXH_PRIME64_1 + XXH_PRIME64_4;
}

static uint64_t
xxh64(const unsigned char *p, size_t length, uint64_t seed)
{
    const unsigned char *end = p + length;
    uint64_t h;
    if (length >= 32) {
        uint64_t v1 = seed + XXH_PRIME64_1 + XXH_PRIME64_2;
        uint64_t v2 = seed + XXH_PRIME64_2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - XXH_PRIME64_1;
        const unsigned char *limit = end - 32;
        do {
            v1 = xxh_round(v1, xxh_read64(p));
            v2 = xxh_round(v2, xxh_read64(p + 8));
            v3 = xxh_round(v3, xxh_read64(p + 16));
            v4 = xxh_round(v4, xxh_read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = xxh_rotl64(v1, 1) + xxh_rotl64(v2, 7) + xxh_rotl64(v3, 12) + xxh_rotl64(v4, 18);
        h = xxh_merge_round(h, v1);
        h = xxh_merge_round(h, v2);
        h = xxh_merge_round(h, v3);
        h = xxh_merge_round(h, v4);
    } else {
        h = seed + XXH_PRIME64_5;
    }
    h += (uint64_t)length;
    while (p + 8 <= end) {
        h ^= xxh_round(0, xxh_read64(p));
        h = xxh_rotl64(h, 27) * XXH_PRIME64_1 + XXH_PRIME64_4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)xxh_read32(p) * XXH_PRIME64_1;
        h = xxh_rotl64(h, 23) * XXH_PRIME64_2 + XXH_PRIME64_3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * XXH_PRIME64_5;
        h = xxh_rotl64(h, 11) * XXH_PRIME64_1;
        p++;
    }
    h ^= h >> 33;
    h *= XXH_PRIME64_2;
    h ^= h >> 29;
    h *= XXH_PRIME64_3;
    h ^= h >> 32;
    return h;
}

#endif
