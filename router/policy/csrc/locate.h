/* locate: one call for what a ring policy with cache views needs per decision. */
#ifndef LLMFLEET_FASTPATH_LOCATE_H
#define LLMFLEET_FASTPATH_LOCATE_H

#include "common.h"
#include "hashing.h"
#include "lru.h"
#include "ring.h"

PyDoc_STRVAR(locate_doc,
"locate(tokens, mult, salt, base_length, hot_step, max_length, hot, splits,\n"
"       lookups, eligible, tables, names) -> (PromptKey, homes, cached_blocks, hashes)\n\n"
"The per-decision work of a ring policy with cache views, composed in one call from the\n"
"same kernels as the separate calls (ring_keys.KeyedRings.locate documents it):\n"
"  1. hashes: the prompt's prefix hashes (prefix_hashes), uint64 in a bytes object;\n"
"  2. the prompt's key (prompt_key, reusing hashes);\n"
"  3. homes: on the first RingIndex of lookups, the first eligible owner of the key hash;\n"
"     on the second (if any), the first eligible owner other than that (RingIndex.first),\n"
"     each as names[slot];\n"
"  4. cached_blocks, per home: tables[slot].cached_blocks(out, hint) (0 where tables is\n"
"     None or holds None), the hint for the first being one hot step short of a\n"
"     lengthened key, and for each next one the previous answer.");

static PyObject *
fastpath_locate(PyObject *self, PyObject *args)
{
    PyObject *tokens_object, *mult_object, *salt_object, *hot, *splits;
    PyObject *lookups, *tables, *names;
    Py_ssize_t base_length, hot_step, max_length;
    Py_buffer mask;
    if (!PyArg_ParseTuple(args, "OOOnnnOOO!y*OO!", &tokens_object, &mult_object, &salt_object,
                          &base_length, &hot_step, &max_length, &hot, &splits, &PyTuple_Type,
                          &lookups, &mask, &tables, &PyList_Type, &names))
        return NULL;
    PyObject *result = NULL, *key = NULL, *homes = NULL, *blocks = NULL, *hashes_object = NULL;
    PromptBuffers b;
    PromptHashing p;
    memset(&b, 0, sizeof b);
    if (check_key_args(hot_step, hot, splits) < 0)
        goto done;
    Py_ssize_t num_lookups = PyTuple_GET_SIZE(lookups);
    if (num_lookups < 1 || num_lookups > 2) {
        PyErr_SetString(PyExc_ValueError, "locate: one or two rings");
        goto done;
    }
    for (Py_ssize_t r = 0; r < num_lookups; r++) {
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(lookups, r), &RingIndexType)) {
            PyErr_SetString(PyExc_TypeError, "lookups must be RingIndex objects");
            goto done;
        }
    }
    if (tables != Py_None && !PyList_Check(tables)) {
        PyErr_SetString(PyExc_TypeError, "tables must be a list or None");
        goto done;
    }
    if (get_prompt(tokens_object, mult_object, salt_object, NULL, &b, &p) < 0)
        goto done;
    Py_ssize_t block_tokens = 2 * p.words_per_block;
    Py_ssize_t count = p.num_tokens / block_tokens;
    if (p.num_salts < count) {
        PyErr_SetString(PyExc_ValueError, "locate: the salt table does not cover the prompt");
        goto done;
    }
    /* The prompt's prefix hashes, in a new bytes object (cheaper than a numpy array, and
     * every consumer takes a buffer); the key then reads them as "the caller's". */
    hashes_object = PyBytes_FromStringAndSize(NULL, count * 8);
    if (hashes_object == NULL)
        goto done;
    uint64_t *hashes = (uint64_t *)PyBytes_AS_STRING(hashes_object);
    hash_blocks(p.tokens, p.mult, p.words_per_block, p.salt, hashes, count, 0);
    p.hashes = hashes;
    p.num_hashes = count;
    key = compute_prompt_key(&p, base_length, hot_step, max_length, hot, splits);
    if (key == NULL)
        goto done;
    uint64_t position = PyLong_AsUnsignedLongLong(PyStructSequence_GET_ITEM(key, 0));
    Py_ssize_t key_length = PyLong_AsSsize_t(PyStructSequence_GET_ITEM(key, 1));
    Py_ssize_t chain_length = PyTuple_GET_SIZE(PyStructSequence_GET_ITEM(key, 2));
    long found[2];
    Py_ssize_t num_found = 0;
    for (Py_ssize_t r = 0; r < num_lookups; r++) {
        RingIndex *ring = (RingIndex *)PyTuple_GET_ITEM(lookups, r);
        int exclude = num_found ? (int)found[num_found - 1] : -1;
        long slot = ring_first(ring, position, (const unsigned char *)mask.buf, mask.len,
                               exclude);
        if (slot < 0)
            break;
        found[num_found++] = slot;
    }
    homes = PyTuple_New(num_found);
    blocks = PyTuple_New(num_found);
    if (homes == NULL || blocks == NULL)
        goto done;
    /* Search hint: a lengthened key ends one hot step past the point where the prompts
     * through its prefix diverge, likely where this prompt's cached prefix ends; for the
     * next home, the previous one's answer (a conversation's homes tend to hold the same). */
    Py_ssize_t hint = chain_length > 1 ? (key_length - hot_step) / block_tokens : 0;
    for (Py_ssize_t k = 0; k < num_found; k++) {
        PyObject *table = Py_None;
        if (tables != Py_None && found[k] < PyList_GET_SIZE(tables))
            table = PyList_GET_ITEM(tables, found[k]);
        if (table != Py_None && !PyObject_TypeCheck(table, &PrefixLruType)) {
            PyErr_SetString(PyExc_TypeError, "tables must hold PrefixLru objects or None");
            goto done;
        }
        hint = table == Py_None ? 0
                                : lru_cached_blocks((PrefixLru *)table, hashes, count, hint);
        if (found[k] >= PyList_GET_SIZE(names)) {
            PyErr_SetString(PyExc_IndexError, "locate: a ring slot has no name");
            goto done;
        }
        PyObject *name = PyList_GET_ITEM(names, found[k]);
        PyObject *blocks_value = PyLong_FromSsize_t(hint);
        if (blocks_value == NULL)
            goto done;
        Py_INCREF(name);
        PyTuple_SET_ITEM(homes, k, name);
        PyTuple_SET_ITEM(blocks, k, blocks_value);
    }
    result = PyTuple_Pack(4, key, homes, blocks, hashes_object);
done:
    Py_XDECREF(key);
    Py_XDECREF(homes);
    Py_XDECREF(blocks);
    Py_XDECREF(hashes_object);
    release_prompt(&b);
    PyBuffer_Release(&mask);
    return result;
}

#endif
