/* locate: one call for what a ring policy with cache views needs per decision. */
#ifndef LLMFLEET_FASTPATH_LOCATE_H
#define LLMFLEET_FASTPATH_LOCATE_H

#include "common.h"
#include "hashing.h"
#include "lru.h"
#include "ring.h"
#include "holders.h"

PyDoc_STRVAR(locate_doc,
"locate(tokens, mult, salt, base_length, hot_step, max_length, hot, splits,\n"
"       lookups, eligible, tables, names, continuity=None)\n"
"    -> (PromptKey, homes, cached_blocks, hashes, candidate)\n\n"
"The per-decision work of a ring policy with cache views, composed in one call from the\n"
"same kernels as the separate calls (ring_keys.KeyedRings.locate documents it):\n"
"  1. hashes: the prompt's prefix hashes (prefix_hashes), uint64 in a bytes object;\n"
"  2. the prompt's key (prompt_key, reusing hashes);\n"
"  3. homes: on the first RingIndex of lookups, the first eligible owner of the key hash;\n"
"     on the second (if any), the first eligible owner other than that (RingIndex.first),\n"
"     each as names[slot];\n"
"  4. cached_blocks, per home: tables[slot].cached_blocks(out, hint) (0 where tables is\n"
"     None or holds None), the hint for the first being one hot step short of a\n"
"     lengthened key, and for each next one the previous answer;\n"
"  5. candidate: DualMap's continuity candidate (fastpath_py.locate states the rule), with\n"
"     continuity = (holders, held, routable): a LastHolderIndex, each instance's PrefixLru\n"
"     by id, the routable ids; (id, cached blocks), a reason why the conversation's\n"
"     previous replica cannot be taken ('holder_unroutable', 'holder_evicted'), or None.");

/* DualMap's continuity candidate (fastpath_py.locate states the rule): a new reference to
 * None, a reason string or (id, cached blocks); NULL with an exception set. */
static PyObject *
continuity_candidate(PyObject *continuity, PyObject *homes, const uint64_t *hashes,
                     Py_ssize_t count, Py_ssize_t block_tokens, Py_ssize_t key_length,
                     Py_ssize_t home_blocks, Py_ssize_t num_tokens)
{
    const LastHolderIndex *index = (const LastHolderIndex *)PyTuple_GET_ITEM(continuity, 0);
    PyObject *held = PyTuple_GET_ITEM(continuity, 1);
    PyObject *routable = PyTuple_GET_ITEM(continuity, 2);
    /* Only a prefix deeper than the homes' and than the key can count: the search starts
     * past both (one probe, missed, for any new conversation). */
    Py_ssize_t beyond = key_length / block_tokens, depth;
    int32_t label = holder_deepest(index, hashes, count,
                                   home_blocks > beyond ? home_blocks : beyond, &depth);
    if (label == NO_HOLDER || (depth + index->grid_blocks) * block_tokens <= key_length)
        Py_RETURN_NONE;
    PyObject *holder = PyList_GET_ITEM(index->names, label);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(homes); k++) {
        int same = PyObject_RichCompareBool(holder, PyTuple_GET_ITEM(homes, k), Py_EQ);
        if (same < 0)
            return NULL;
        if (same)
            Py_RETURN_NONE;
    }
    /* Past the key, the index shows the holder got this conversation's own prefix; a grid
     * step short of the key, only its cache view can tell. */
    int proven = depth * block_tokens >= key_length;
    PyObject *table = PyDict_GetItemWithError(held, holder);
    if (table == NULL && PyErr_Occurred())
        return NULL;
    int is_routable = table == NULL ? 0 : PySet_Contains(routable, holder);
    if (is_routable < 0)
        return NULL;
    if (!is_routable) {
        if (proven)
            return PyUnicode_FromString("holder_unroutable");
        Py_RETURN_NONE;
    }
    if (!PyObject_TypeCheck(table, &PrefixLruType)) {
        PyErr_SetString(PyExc_TypeError, "continuity: held must map ids to PrefixLru objects");
        return NULL;
    }
    Py_ssize_t blocks = lru_cached_blocks((const PrefixLru *)table, hashes, count, depth);
    if (blocks < depth) { /* the view lost what the index recorded */
        if (proven)
            return PyUnicode_FromString("holder_evicted");
        Py_RETURN_NONE;
    }
    Py_ssize_t most = num_tokens > 1 ? num_tokens - 1 : 0;
    Py_ssize_t cached = blocks * block_tokens < most ? blocks * block_tokens : most;
    if (blocks <= home_blocks || cached < key_length)
        Py_RETURN_NONE;
    return Py_BuildValue("(On)", holder, blocks);
}

static PyObject *
fastpath_locate(PyObject *self, PyObject *args)
{
    PyObject *tokens_object, *mult_object, *salt_object, *hot, *splits;
    PyObject *lookups, *tables, *names, *continuity = Py_None;
    Py_ssize_t base_length, hot_step, max_length;
    Py_buffer mask;
    if (!PyArg_ParseTuple(args, "OOOnnnOOO!y*OO!|O", &tokens_object, &mult_object,
                          &salt_object, &base_length, &hot_step, &max_length, &hot, &splits,
                          &PyTuple_Type, &lookups, &mask, &tables, &PyList_Type, &names,
                          &continuity))
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
    if (continuity != Py_None
            && (!PyTuple_Check(continuity) || PyTuple_GET_SIZE(continuity) != 3
                || !PyObject_TypeCheck(PyTuple_GET_ITEM(continuity, 0), &LastHolderIndexType)
                || !PyDict_Check(PyTuple_GET_ITEM(continuity, 1))
                || !PyAnySet_Check(PyTuple_GET_ITEM(continuity, 2)))) {
        PyErr_SetString(PyExc_TypeError, "continuity must be None or (LastHolderIndex, "
                                         "dict of PrefixLru, set of routable ids)");
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
    Py_ssize_t home_blocks = 0; /* the most any home holds */
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
        if (hint > home_blocks)
            home_blocks = hint;
    }
    PyObject *candidate = Py_None;
    if (continuity != Py_None && num_found > 0) {
        candidate = continuity_candidate(continuity, homes, hashes, count, block_tokens,
                                         key_length, home_blocks, p.num_tokens);
        if (candidate == NULL)
            goto done;
    } else {
        Py_INCREF(candidate);
    }
    result = PyTuple_Pack(5, key, homes, blocks, hashes_object, candidate);
    Py_DECREF(candidate);
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
