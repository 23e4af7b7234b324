/* Prefix-block hashes and ring keys (router/policy/hashing.py and keys.py state them). */
#ifndef LLMFLEET_FASTPATH_HASHING_H
#define LLMFLEET_FASTPATH_HASHING_H

#include "common.h"
#include "xxh64.h"

/* prefix_hashes(tokens, mult, salt, salt_start, out, start_prefix) -> None
 *
 * tokens: C-contiguous int32 little-endian, at least len(out) blocks of 2 * len(mult)
 *         tokens (a trailing partial block is ignored);
 * mult:   uint64 per 64-bit word of a block (odd multipliers);
 * salt:   uint64 per block position; block j of tokens takes salt[salt_start + j];
 * out:    writable uint64, one per block.
 * out[k] = start_prefix + sum_{j<=k} ((sum_w word[j][w] * mult[w]) ^ salt[j])  (mod 2^64),
 * where word[j][w] is the little-endian uint64 made of tokens 2w and 2w+1 of block j:
 * numpy's ``words @ mult`` then XOR, then ``add.accumulate``.
 */
static PyObject *
fastpath_prefix_hashes(PyObject *self, PyObject *args)
{
    Py_buffer tokens, mult, salt, out;
    Py_ssize_t salt_start;
    unsigned long long start_prefix;
    if (!PyArg_ParseTuple(args, "y*y*y*nw*K", &tokens, &mult, &salt, &salt_start, &out,
                          &start_prefix))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t words_per_block = mult.len / 8;
    Py_ssize_t blocks = out.len / 8;
    if (words_per_block <= 0 || tokens.len < blocks * words_per_block * 8 || salt_start < 0
            || salt.len / 8 - salt_start < blocks) {
        PyErr_SetString(PyExc_ValueError, "prefix_hashes: buffer sizes do not match");
        goto done;
    }
    /* The GIL stays held: releasing it costs more than the loop and could hand the
     * interpreter to another thread in the middle of a decision. */
    hash_blocks((const unsigned char *)tokens.buf, (const uint64_t *)mult.buf, words_per_block,
                (const uint64_t *)salt.buf + salt_start, (uint64_t *)out.buf, blocks,
                (uint64_t)start_prefix);
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&mult);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *
fastpath_mix64(PyObject *self, PyObject *value)
{
    uint64_t x = PyLong_AsUnsignedLongLongMask(value);
    if (x == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(mix64_value(x));
}

/* ---- Ring keys ---------------------------------------------------------------------------
 *
 * A prompt's ring key at length L (router/policy/keys.py states the rule):
 *
 *   mix64(prefix hash of the L / B blocks)   when L is a whole number of hash blocks B
 *                                            (the prefix hash the cache views use anyway);
 *   xxh64(int32 LE bytes of tokens[:L], KEY_SEED)   otherwise (a prompt shorter than a
 *                                            block, a key cut by the prompt's end).
 */

#define KEY_SEED 0x6C6C6D666C656574ULL /* "llmfleet" */

typedef struct {
    const unsigned char *tokens; /* int32 LE */
    Py_ssize_t num_tokens;
    const uint64_t *mult;
    Py_ssize_t words_per_block;
    const uint64_t *salt;
    Py_ssize_t num_salts;
    const uint64_t *hashes; /* the caller's prefix hashes (any prefix of them) */
    Py_ssize_t num_hashes;
} PromptHashing;

/* The key hash at length, or sets an exception and returns 0 with *ok = 0. */
static uint64_t
key_value(const PromptHashing *p, Py_ssize_t length, int *ok)
{
    Py_ssize_t block_tokens = 2 * p->words_per_block;
    Py_ssize_t blocks = length / block_tokens;
    *ok = 0;
    if (length < 0 || length > p->num_tokens) {
        PyErr_SetString(PyExc_ValueError, "key length past the prompt");
        return 0;
    }
    *ok = 1;
    if (blocks == 0 || blocks * block_tokens != length)
        return xxh64(p->tokens, 4 * (size_t)length, KEY_SEED);
    if (blocks <= p->num_hashes)
        return mix64_value(p->hashes[blocks - 1]);
    if (blocks > p->num_salts) {
        *ok = 0;
        PyErr_SetString(PyExc_ValueError, "key length past the salt table");
        return 0;
    }
    /* Past the caller's hashes: continue the prefix hash from the last one given. */
    uint64_t h = p->num_hashes ? p->hashes[p->num_hashes - 1] : 0;
    for (Py_ssize_t k = p->num_hashes; k < blocks; k++)
        h += block_value(p->tokens + 4 * block_tokens * k, p->mult, p->words_per_block)
             ^ p->salt[k];
    return mix64_value(h);
}

typedef struct {
    Py_buffer tokens, mult, salt, hashes;
} PromptBuffers;

static int
get_prompt(PyObject *tokens, PyObject *mult, PyObject *salt, PyObject *hashes,
           PromptBuffers *b, PromptHashing *p)
{
    memset(b, 0, sizeof *b);
    if (PyObject_GetBuffer(tokens, &b->tokens, PyBUF_C_CONTIGUOUS) < 0
            || PyObject_GetBuffer(mult, &b->mult, PyBUF_C_CONTIGUOUS) < 0
            || PyObject_GetBuffer(salt, &b->salt, PyBUF_C_CONTIGUOUS) < 0
            || (hashes != NULL
                && PyObject_GetBuffer(hashes, &b->hashes, PyBUF_C_CONTIGUOUS) < 0))
        return -1;
    p->tokens = (const unsigned char *)b->tokens.buf;
    p->num_tokens = b->tokens.len / 4;
    p->mult = (const uint64_t *)b->mult.buf;
    p->words_per_block = b->mult.len / 8;
    p->salt = (const uint64_t *)b->salt.buf;
    p->num_salts = b->salt.len / 8;
    p->hashes = (const uint64_t *)b->hashes.buf;
    p->num_hashes = b->hashes.len / 8;
    if (b->tokens.len % 4 || p->words_per_block <= 0
            || b->hashes.len % 8) {
        PyErr_SetString(PyExc_ValueError, "prompt key: bad buffer sizes");
        return -1;
    }
    return 0;
}

static void
release_prompt(PromptBuffers *b)
{
    if (b->tokens.obj) PyBuffer_Release(&b->tokens);
    if (b->mult.obj) PyBuffer_Release(&b->mult);
    if (b->salt.obj) PyBuffer_Release(&b->salt);
    if (b->hashes.obj) PyBuffer_Release(&b->hashes);
}

PyDoc_STRVAR(key_hash_doc,
"key_hash(tokens, mult, salt, hashes, length) -> int\n\n"
"A prompt's ring key hash at length (see the comment above it in csrc/hashing.h);\n"
"hashes are the prompt's prefix hashes as far as the caller has them (may be empty).");

static PyObject *
fastpath_key_hash(PyObject *self, PyObject *args)
{
    PyObject *tokens, *mult, *salt, *hashes;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "OOOOn", &tokens, &mult, &salt, &hashes, &length))
        return NULL;
    PromptBuffers b;
    PromptHashing p;
    PyObject *result = NULL;
    memset(&b, 0, sizeof b);
    if (get_prompt(tokens, mult, salt, hashes, &b, &p) == 0) {
        int ok;
        uint64_t h = key_value(&p, length, &ok);
        if (ok)
            result = PyLong_FromUnsignedLongLong(h);
    }
    release_prompt(&b);
    return result;
}

static PyObject *
fastpath_xxh64(PyObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &data, &seed))
        return NULL;
    uint64_t h = xxh64((const unsigned char *)data.buf, (size_t)data.len, (uint64_t)seed);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

/* The split recorded for a hot key, -1 if the key is not hot, -2 on error. */
static Py_ssize_t
hot_split(PyObject *hot, PyObject *splits, uint64_t key)
{
    PyObject *value = PyLong_FromUnsignedLongLong(key);
    if (value == NULL)
        return -2;
    Py_ssize_t split = -1;
    int is_hot = PySet_Contains(hot, value);
    if (is_hot < 0) {
        split = -2;
    } else if (is_hot) {
        PyObject *found = PyDict_GetItemWithError(splits, value);
        if (found != NULL) {
            split = PyLong_AsSsize_t(found);
            if (split < 0 && !PyErr_Occurred())
                split = -1;
            else if (split == -1 && PyErr_Occurred())
                split = -2;
        } else if (PyErr_Occurred()) {
            split = -2;
        }
    }
    Py_DECREF(value);
    return split;
}

/* PromptKey: a prompt's ring key as a named tuple made in C (keys.PromptKey). */
static PyStructSequence_Field prompt_key_fields[] = {
    {"hash", "the key hash (a ring position)"},
    {"length", "tokens the key covers"},
    {"chain", "key hashes from the base key to this key"},
    {NULL, NULL},
};

static PyStructSequence_Desc prompt_key_desc = {
    "router.policy._fastpath.PromptKey",
    "A prompt's ring key: (hash, length, chain).",
    prompt_key_fields,
    3,
};

static PyTypeObject *PromptKeyType = NULL;

/* The key of a prompt (keys.PrefixKeyBuilder.key states the rule): the key hash at
 * length; while that key is in the set hot, the key lengthened to just past splits[key]
 * (the next multiple of hot_step, capped by the prompt and max_length), as long as that is
 * longer. A new PromptKey, or NULL with an exception set. */
static PyObject *
compute_prompt_key(const PromptHashing *p, Py_ssize_t length, Py_ssize_t hot_step,
                   Py_ssize_t max_length, PyObject *hot, PyObject *splits)
{
    int ok;
    uint64_t key = key_value(p, length, &ok);
    if (!ok)
        return NULL;
    PyObject *chain = PyList_New(0), *result = NULL;
    if (chain == NULL)
        return NULL;
    for (;;) {
        PyObject *item = PyLong_FromUnsignedLongLong(key);
        if (item == NULL || PyList_Append(chain, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
        if (PySet_GET_SIZE(hot) == 0)
            break;
        Py_ssize_t split = hot_split(hot, splits, key);
        if (split == -2)
            goto done;
        if (split < 0)
            break;
        Py_ssize_t longer = (split / hot_step + 1) * hot_step;
        if (longer > p->num_tokens)
            longer = p->num_tokens;
        if (longer > max_length)
            longer = max_length;
        if (longer <= length)
            break;
        length = longer;
        key = key_value(p, length, &ok);
        if (!ok)
            goto done;
    }
    PyObject *chain_tuple = PyList_AsTuple(chain);
    if (chain_tuple == NULL)
        goto done;
    result = PyStructSequence_New(PromptKeyType);
    if (result == NULL) {
        Py_DECREF(chain_tuple);
        goto done;
    }
    PyObject *hash_value = PyLong_FromUnsignedLongLong(key);
    PyObject *length_value = PyLong_FromSsize_t(length);
    if (hash_value == NULL || length_value == NULL) {
        Py_XDECREF(hash_value);
        Py_XDECREF(length_value);
        Py_DECREF(chain_tuple);
        Py_CLEAR(result);
        goto done;
    }
    PyStructSequence_SET_ITEM(result, 0, hash_value);
    PyStructSequence_SET_ITEM(result, 1, length_value);
    PyStructSequence_SET_ITEM(result, 2, chain_tuple);
done:
    Py_DECREF(chain);
    return result;
}

static int
check_key_args(Py_ssize_t hot_step, PyObject *hot, PyObject *splits)
{
    if (hot_step <= 0) {
        PyErr_SetString(PyExc_ValueError, "hot_step must be positive");
        return -1;
    }
    if (!PySet_Check(hot) || !PyDict_Check(splits)) {
        PyErr_SetString(PyExc_TypeError, "hot must be a set and splits a dict");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(prompt_key_doc,
"prompt_key(tokens, mult, salt, hashes, base_length, hot_step, max_length, hot, splits)\n"
"-> PromptKey\n\n"
"A prompt's ring key (keys.PrefixKeyBuilder.key): the key hash at base_length; while that\n"
"key is in the set hot, the key lengthened to just past splits[key] (the next multiple of\n"
"hot_step, capped by the prompt and max_length), as long as that is longer. chain holds\n"
"every key hash from the base key on.");

static PyObject *
fastpath_prompt_key(PyObject *self, PyObject *args)
{
    PyObject *tokens, *mult, *salt, *hashes, *hot, *splits;
    Py_ssize_t length, hot_step, max_length;
    if (!PyArg_ParseTuple(args, "OOOOnnnOO", &tokens, &mult, &salt, &hashes, &length,
                          &hot_step, &max_length, &hot, &splits))
        return NULL;
    if (check_key_args(hot_step, hot, splits) < 0)
        return NULL;
    PromptBuffers b;
    PromptHashing p;
    PyObject *result = NULL;
    memset(&b, 0, sizeof b);
    if (get_prompt(tokens, mult, salt, hashes, &b, &p) == 0)
        result = compute_prompt_key(&p, length, hot_step, max_length, hot, splits);
    release_prompt(&b);
    return result;
}

#endif
