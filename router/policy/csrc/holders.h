#ifndef LLMFLEET_FASTPATH_HOLDERS_H
#define LLMFLEET_FASTPATH_HOLDERS_H

#include "common.h"
#include <structmember.h>

/* ---- LastHolderIndex ---------------------------------------------------------------------
 *
 * Fleet-wide: which instance a prompt through each prefix was last routed to (DualMap's
 * continuity candidate; fastpath_py.LastHolderIndex states the rule). Two generations of
 * open-addressing tables from a uint64 prefix hash to a small int label, each label an
 * instance id interned in ``names``. As Python dicts of ints a probe missed the CPU caches
 * two or three times (index, entry, key object) and ``deepest`` cost ~3 µs inside a
 * decision; here a probe is one 16-byte slot and locate runs the search itself.
 *
 * A generation's table keeps at most half its slots full and grows by doubling; when the
 * newer generation reaches capacity / 2 entries (checked after each recorded prompt, as the
 * Python dict version does) it becomes the older, and the older's table, emptied, becomes
 * the newer (no reallocation once both have grown).
 */

#define NO_HOLDER (-1)

typedef struct {
    uint64_t key;
    int32_t label; /* NO_HOLDER when the slot is free */
} HolderSlot;

typedef struct {
    HolderSlot *slots;
    size_t mask;
    int shift;
    Py_ssize_t size;
} HolderTable;

typedef struct {
    PyObject_HEAD
    HolderTable tables[2]; /* tables[newer] is the newer generation */
    int newer;
    Py_ssize_t capacity, grid_blocks, dense_blocks;
    PyObject *names;  /* list: label -> instance id */
    PyObject *labels; /* dict: instance id -> label */
} LastHolderIndex;

static PyTypeObject LastHolderIndexType;

static int
holder_table_alloc(HolderTable *table, int bits)
{
    size_t size = (size_t)1 << bits;
    HolderSlot *slots = PyMem_Malloc(size * sizeof(HolderSlot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < size; i++)
        slots[i].label = NO_HOLDER;
    PyMem_Free(table->slots);
    table->slots = slots;
    table->mask = size - 1;
    table->shift = 64 - bits;
    return 0;
}

/* Slot holding key, or the free slot where it would go (same multiplicative home slot as
 * PrefixLru: prefix hashes' low bits depend on the low bits of the tokens only). */
static inline size_t
holder_find(const HolderTable *table, uint64_t key)
{
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ULL) >> table->shift);
    for (;;) {
        const HolderSlot *slot = &table->slots[i];
        if (slot->label == NO_HOLDER || slot->key == key)
            return i;
        i = (i + 1) & table->mask;
    }
}

static int
holder_put(HolderTable *table, uint64_t key, int32_t label)
{
    size_t i = holder_find(table, key);
    if (table->slots[i].label != NO_HOLDER) {
        table->slots[i].label = label;
        return 0;
    }
    if ((size_t)(table->size + 1) * 2 > table->mask + 1) { /* keep it at most half full */
        HolderTable grown = {NULL, 0, 0, table->size};
        if (holder_table_alloc(&grown, 64 - table->shift + 1) < 0)
            return -1;
        for (size_t k = 0; k <= table->mask; k++) {
            if (table->slots[k].label != NO_HOLDER)
                grown.slots[holder_find(&grown, table->slots[k].key)] = table->slots[k];
        }
        PyMem_Free(table->slots);
        *table = grown;
        i = holder_find(table, key);
    }
    table->slots[i].key = key;
    table->slots[i].label = label;
    table->size++;
    return 0;
}

/* The label of key's last holder (the newer generation first), or NO_HOLDER. */
static inline int32_t
holder_label(const LastHolderIndex *index, uint64_t key)
{
    const HolderTable *newer = &index->tables[index->newer];
    int32_t label = newer->slots[holder_find(newer, key)].label;
    if (label != NO_HOLDER)
        return label;
    const HolderTable *older = &index->tables[1 - index->newer];
    return older->slots[holder_find(older, key)].label;
}

static inline Py_ssize_t
holder_blocks_at(const LastHolderIndex *index, Py_ssize_t point)
{
    Py_ssize_t dense = index->dense_blocks;
    return point <= dense ? point : dense + (point - dense) * index->grid_blocks;
}

static inline Py_ssize_t
holder_points_within(const LastHolderIndex *index, Py_ssize_t blocks)
{
    Py_ssize_t dense = index->dense_blocks;
    return blocks <= dense ? blocks : dense + (blocks - dense) / index->grid_blocks;
}

/* See deepest_doc; beyond >= 0. The label, or NO_HOLDER with *depth = 0. */
static int32_t
holder_deepest(const LastHolderIndex *index, const uint64_t *hashes, Py_ssize_t count,
               Py_ssize_t beyond, Py_ssize_t *depth)
{
    Py_ssize_t dense = index->dense_blocks, grid = index->grid_blocks;
    Py_ssize_t after = beyond < dense ? beyond + 1
                                      : beyond + grid - (beyond - dense) % grid;
    *depth = 0;
    if (after > count || holder_label(index, hashes[after - 1]) == NO_HOLDER)
        return NO_HOLDER; /* the usual whole search: one probe */
    Py_ssize_t lo = holder_points_within(index, after);
    Py_ssize_t hi = holder_points_within(index, count);
    /* invariant: grid point lo is held, grid point hi + 1 is not */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi + 1) >> 1;
        if (holder_label(index, hashes[holder_blocks_at(index, mid) - 1]) != NO_HOLDER)
            lo = mid;
        else
            hi = mid - 1;
    }
    *depth = holder_blocks_at(index, lo);
    return holder_label(index, hashes[*depth - 1]);
}

static PyObject *
LastHolderIndex_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    LastHolderIndex *self = (LastHolderIndex *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    memset(self->tables, 0, sizeof self->tables);
    self->newer = 0;
    self->names = PyList_New(0);
    self->labels = PyDict_New();
    if (self->names == NULL || self->labels == NULL
            || holder_table_alloc(&self->tables[0], 6) < 0
            || holder_table_alloc(&self->tables[1], 6) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
LastHolderIndex_init(LastHolderIndex *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "grid_blocks", "dense_blocks", NULL};
    Py_ssize_t capacity = 1 << 18, grid_blocks = 4, dense_blocks = 8;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nnn", kwlist, &capacity, &grid_blocks,
                                     &dense_blocks))
        return -1;
    if (capacity < 2 || grid_blocks < 1 || dense_blocks < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "need capacity >= 2, grid_blocks >= 1, dense_blocks >= 0");
        return -1;
    }
    if (self->tables[0].size || self->tables[1].size) {
        PyErr_SetString(PyExc_RuntimeError, "LastHolderIndex: already in use");
        return -1;
    }
    self->capacity = capacity;
    self->grid_blocks = grid_blocks;
    self->dense_blocks = dense_blocks;
    return 0;
}

static void
LastHolderIndex_dealloc(LastHolderIndex *self)
{
    PyMem_Free(self->tables[0].slots);
    PyMem_Free(self->tables[1].slots);
    Py_XDECREF(self->names);
    Py_XDECREF(self->labels);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
LastHolderIndex_len(LastHolderIndex *self)
{
    return self->tables[0].size + self->tables[1].size;
}

/* instance_id's label, interned on first use; -1 with an exception set on failure. */
static int32_t
holder_intern(LastHolderIndex *self, PyObject *instance_id)
{
    PyObject *found = PyDict_GetItemWithError(self->labels, instance_id);
    if (found != NULL)
        return (int32_t)PyLong_AsLong(found);
    if (PyErr_Occurred())
        return -1;
    Py_ssize_t label = PyList_GET_SIZE(self->names);
    if (label >= INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "LastHolderIndex: too many instance ids");
        return -1;
    }
    PyObject *value = PyLong_FromSsize_t(label);
    if (value == NULL)
        return -1;
    if (PyList_Append(self->names, instance_id) < 0) {
        Py_DECREF(value);
        return -1;
    }
    int failed = PyDict_SetItem(self->labels, instance_id, value) < 0;
    Py_DECREF(value);
    if (failed) { /* leave the names as they were */
        PyObject *type, *error, *traceback;
        PyErr_Fetch(&type, &error, &traceback);
        PyList_SetSlice(self->names, label, label + 1, NULL);
        PyErr_Restore(type, error, traceback);
        return -1;
    }
    return (int32_t)label;
}

PyDoc_STRVAR(holder_record_doc,
"record(prefix_hashes, instance_id, from_block=0) -> None\n\n"
"A prompt with prefix_hashes (uint64 buffer) was routed to instance_id: its grid\n"
"prefixes (every block up to dense_blocks, then every grid_blocks blocks) now name it,\n"
"except those of at most from_block blocks (the caller knows the instance held them).");

static PyObject *
LastHolderIndex_record(LastHolderIndex *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"prefix_hashes", "instance_id", "from_block", NULL};
    PyObject *object, *instance_id;
    Py_ssize_t from_block = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|n", kwlist, &object, &instance_id,
                                     &from_block))
        return NULL;
    if (!PyUnicode_Check(instance_id)) {
        PyErr_SetString(PyExc_TypeError, "instance_id must be a str");
        return NULL;
    }
    if (from_block < 0) {
        PyErr_SetString(PyExc_ValueError, "from_block must be >= 0");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(object, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *result = NULL;
    if (view.len % 8) {
        PyErr_SetString(PyExc_ValueError, "prefix_hashes must be a uint64 buffer");
        goto done;
    }
    int32_t label = holder_intern(self, instance_id);
    if (label < 0)
        goto done;
    const uint64_t *hashes = (const uint64_t *)view.buf;
    Py_ssize_t count = view.len / 8, dense = self->dense_blocks, grid = self->grid_blocks;
    HolderTable *newer = &self->tables[self->newer];
    /* 1-based block counts of the grid prefixes, from the first past from_block's. */
    Py_ssize_t first = holder_blocks_at(self, holder_points_within(self, from_block) + 1);
    for (Py_ssize_t blocks = first; blocks <= count;
         blocks = blocks < dense ? blocks + 1 : (blocks == dense ? dense + grid
                                                                 : blocks + grid)) {
        if (holder_put(newer, hashes[blocks - 1], label) < 0)
            goto done;
    }
    if (newer->size >= self->capacity / 2) { /* the newer becomes the older */
        self->newer = 1 - self->newer;
        HolderTable *emptied = &self->tables[self->newer];
        for (size_t i = 0; i <= emptied->mask; i++)
            emptied->slots[i].label = NO_HOLDER;
        emptied->size = 0;
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(holder_deepest_doc,
"deepest(prefix_hashes, beyond=0) -> (instance_id | None, blocks)\n\n"
"The last holder of the prompt's deepest held grid prefix and that prefix's length in\n"
"blocks, if it is longer than the grid prefix of beyond blocks; else (None, 0). The grid\n"
"prefix just past beyond is probed first (usually the whole search), then a binary search.");

static PyObject *
LastHolderIndex_deepest(LastHolderIndex *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"prefix_hashes", "beyond", NULL};
    PyObject *object;
    Py_ssize_t beyond = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|n", kwlist, &object, &beyond))
        return NULL;
    if (beyond < 0) {
        PyErr_SetString(PyExc_ValueError, "beyond must be >= 0");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(object, &view, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (view.len % 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "prefix_hashes must be a uint64 buffer");
        return NULL;
    }
    Py_ssize_t depth;
    int32_t label = holder_deepest(self, (const uint64_t *)view.buf, view.len / 8, beyond,
                                   &depth);
    PyBuffer_Release(&view);
    PyObject *holder = label == NO_HOLDER ? Py_None : PyList_GET_ITEM(self->names, label);
    return Py_BuildValue("(On)", holder, depth);
}

static PyObject *
LastHolderIndex_blocks_at(LastHolderIndex *self, PyObject *value)
{
    Py_ssize_t point = PyLong_AsSsize_t(value);
    if (point == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromSsize_t(holder_blocks_at(self, point));
}

static PyObject *
LastHolderIndex_points_within(LastHolderIndex *self, PyObject *value)
{
    Py_ssize_t blocks = PyLong_AsSsize_t(value);
    if (blocks == -1 && PyErr_Occurred())
        return NULL;
    if (blocks < 0) {
        PyErr_SetString(PyExc_ValueError, "blocks must be >= 0");
        return NULL;
    }
    return PyLong_FromSsize_t(holder_points_within(self, blocks));
}

static PyMethodDef LastHolderIndex_methods[] = {
    {"record", (PyCFunction)(void (*)(void))LastHolderIndex_record,
     METH_VARARGS | METH_KEYWORDS, holder_record_doc},
    {"deepest", (PyCFunction)(void (*)(void))LastHolderIndex_deepest,
     METH_VARARGS | METH_KEYWORDS, holder_deepest_doc},
    {"blocks_at", (PyCFunction)LastHolderIndex_blocks_at, METH_O,
     "blocks_at(point) -> int: prefix length in blocks of grid point point (1-based)."},
    {"points_within", (PyCFunction)LastHolderIndex_points_within, METH_O,
     "points_within(blocks) -> int: grid points whose prefix has at most blocks blocks."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef LastHolderIndex_members[] = {
    {"capacity", T_PYSSIZET, offsetof(LastHolderIndex, capacity), READONLY,
     "entries over both generations at which the older is dropped, about"},
    {"grid_blocks", T_PYSSIZET, offsetof(LastHolderIndex, grid_blocks), READONLY,
     "blocks between grid prefixes past dense_blocks"},
    {"dense_blocks", T_PYSSIZET, offsetof(LastHolderIndex, dense_blocks), READONLY,
     "every prefix up to this many blocks is a grid prefix"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods LastHolderIndex_as_sequence = {
    .sq_length = (lenfunc)LastHolderIndex_len,
};

static PyTypeObject LastHolderIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router.policy._fastpath.LastHolderIndex",
    .tp_doc = PyDoc_STR("LastHolderIndex(capacity=1<<18, grid_blocks=4, dense_blocks=8): "
                        "the last instance each routed grid prefix went to."),
    .tp_basicsize = sizeof(LastHolderIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = LastHolderIndex_new,
    .tp_init = (initproc)LastHolderIndex_init,
    .tp_dealloc = (destructor)LastHolderIndex_dealloc,
    .tp_methods = LastHolderIndex_methods,
    .tp_members = LastHolderIndex_members,
    .tp_as_sequence = &LastHolderIndex_as_sequence,
};

#endif
