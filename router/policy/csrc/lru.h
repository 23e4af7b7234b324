#ifndef LLMFLEET_FASTPATH_LRU_H
#define LLMFLEET_FASTPATH_LRU_H

#include "common.h"

/* ---- PrefixLru ---------------------------------------------------------------------------
 *
 * Entries live in a growable array and are threaded on a doubly linked LRU list (head =
 * least recently used). The table maps a key to its entry by linear probing over slots
 * that carry the key inline (one cache line touched per probe); deletion shifts later
 * slots back, so there are no tombstones. Slot of a key: the top bits of key * phi, since
 * the low bits of a multilinear prefix hash depend on the low bits of the tokens only.
 *
 * count is 1 for a block recorded from a routed prompt (approximate view) and the number
 * of engine blocks mapped to the key for a precise view (add/discard). Only the
 * approximate view evicts (``capacity``); a precise view keeps what the engine reports.
 */

#define EMPTY_SLOT (-1)
#define NO_ENTRY (-1)

typedef struct {
    uint64_t key;
    int32_t entry; /* EMPTY_SLOT when free */
} Slot;

typedef struct {
    uint64_t key;
    int32_t prev;   /* towards the least recently used end */
    int32_t next;   /* towards the most recently used end; free list link when unused */
    uint32_t count; /* 0: unused */
} Entry;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t mask;       /* table size - 1 (a power of two) */
    int shift;         /* 64 - log2(table size) */
    Entry *entries;
    int32_t entries_allocated;
    int32_t entries_used; /* high-water mark */
    int32_t free_entry;
    int32_t head, tail;
    Py_ssize_t size;
    Py_ssize_t capacity;
} PrefixLru;

static inline size_t
home_slot(const PrefixLru *lru, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> lru->shift);
}

/* Slot holding key, or the empty slot where it would go. */
static inline size_t
find_slot(const PrefixLru *lru, uint64_t key)
{
    size_t i = home_slot(lru, key);
    for (;;) {
        const Slot *slot = &lru->slots[i];
        if (slot->entry == EMPTY_SLOT || slot->key == key)
            return i;
        i = (i + 1) & lru->mask;
    }
}

static inline int
lru_contains(const PrefixLru *lru, uint64_t key)
{
    return lru->slots[find_slot(lru, key)].entry != EMPTY_SLOT;
}

static int
alloc_table(PrefixLru *lru, int bits)
{
    size_t size = (size_t)1 << bits;
    Slot *slots = PyMem_Malloc(size * sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < size; i++)
        slots[i].entry = EMPTY_SLOT;
    PyMem_Free(lru->slots);
    lru->slots = slots;
    lru->mask = size - 1;
    lru->shift = 64 - bits;
    return 0;
}

/* Keep the table at most half full. */
static int
reserve_slot(PrefixLru *lru)
{
    if ((size_t)(lru->size + 1) * 2 <= lru->mask + 1)
        return 0;
    int bits = 64 - lru->shift + 1;
    if (alloc_table(lru, bits) < 0)
        return -1;
    for (int32_t e = lru->head; e != NO_ENTRY; e = lru->entries[e].next) {
        size_t i = find_slot(lru, lru->entries[e].key);
        lru->slots[i].key = lru->entries[e].key;
        lru->slots[i].entry = e;
    }
    return 0;
}

static int32_t
alloc_entry(PrefixLru *lru)
{
    if (lru->free_entry != NO_ENTRY) {
        int32_t e = lru->free_entry;
        lru->free_entry = lru->entries[e].next;
        return e;
    }
    if (lru->entries_used == lru->entries_allocated) {
        if (lru->entries_allocated >= INT32_MAX / 2) {
            PyErr_SetString(PyExc_OverflowError, "PrefixLru: too many entries");
            return NO_ENTRY;
        }
        int32_t allocated = lru->entries_allocated ? lru->entries_allocated * 2 : 64;
        Entry *entries = PyMem_Realloc(lru->entries, (size_t)allocated * sizeof(Entry));
        if (entries == NULL) {
            PyErr_NoMemory();
            return NO_ENTRY;
        }
        lru->entries = entries;
        lru->entries_allocated = allocated;
    }
    return lru->entries_used++;
}

static inline void
unlink_entry(PrefixLru *lru, int32_t e)
{
    Entry *entry = &lru->entries[e];
    if (entry->prev != NO_ENTRY)
        lru->entries[entry->prev].next = entry->next;
    else
        lru->head = entry->next;
    if (entry->next != NO_ENTRY)
        lru->entries[entry->next].prev = entry->prev;
    else
        lru->tail = entry->prev;
}

static inline void
push_most_recent(PrefixLru *lru, int32_t e)
{
    Entry *entry = &lru->entries[e];
    entry->prev = lru->tail;
    entry->next = NO_ENTRY;
    if (lru->tail != NO_ENTRY)
        lru->entries[lru->tail].next = e;
    else
        lru->head = e;
    lru->tail = e;
}

/* Insert key as most recently used with count 1, or move it there (count kept).
 * Returns the entry, or NO_ENTRY with an exception set. */
static int32_t
touch(PrefixLru *lru, uint64_t key)
{
    size_t i = find_slot(lru, key);
    int32_t e = lru->slots[i].entry;
    if (e != EMPTY_SLOT) {
        if (e != lru->tail) {
            unlink_entry(lru, e);
            push_most_recent(lru, e);
        }
        return e;
    }
    if (reserve_slot(lru) < 0)
        return NO_ENTRY;
    e = alloc_entry(lru);
    if (e == NO_ENTRY)
        return NO_ENTRY;
    i = find_slot(lru, key); /* the table may have grown */
    lru->slots[i].key = key;
    lru->slots[i].entry = e;
    lru->entries[e].key = key;
    lru->entries[e].count = 1;
    push_most_recent(lru, e);
    lru->size++;
    return e;
}

static void
remove_entry(PrefixLru *lru, int32_t e)
{
    size_t i = find_slot(lru, lru->entries[e].key);
    /* Backward-shift deletion: move up every later slot of the run whose home is not
     * cyclically within (i, j], so no lookup ever stops at the hole. */
    size_t j = i;
    for (;;) {
        j = (j + 1) & lru->mask;
        if (lru->slots[j].entry == EMPTY_SLOT)
            break;
        size_t k = home_slot(lru, lru->slots[j].key);
        int stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        lru->slots[i] = lru->slots[j];
        i = j;
    }
    lru->slots[i].entry = EMPTY_SLOT;
    unlink_entry(lru, e);
    lru->entries[e].count = 0;
    lru->entries[e].next = lru->free_entry;
    lru->free_entry = e;
    lru->size--;
}

static void
evict(PrefixLru *lru)
{
    while (lru->size > lru->capacity)
        remove_entry(lru, lru->head);
}

static void
reset(PrefixLru *lru)
{
    PyMem_Free(lru->entries);
    lru->entries = NULL;
    lru->entries_allocated = lru->entries_used = 0;
    lru->free_entry = lru->head = lru->tail = NO_ENTRY;
    lru->size = 0;
}

static int
PrefixLru_init(PrefixLru *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t capacity = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &capacity))
        return -1;
    if (capacity < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
        return -1;
    }
    self->capacity = capacity;
    evict(self);
    return 0;
}

static PyObject *
PrefixLru_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PrefixLru *self = (PrefixLru *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->slots = NULL;
        self->entries = NULL;
        self->capacity = PY_SSIZE_T_MAX;
        reset(self);
        if (alloc_table(self, 6) < 0) {
            Py_DECREF(self);
            return NULL;
        }
    }
    return (PyObject *)self;
}

static void
PrefixLru_dealloc(PrefixLru *self)
{
    PyMem_Free(self->slots);
    PyMem_Free(self->entries);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A Python int as a uint64 key; 0 with *valid = 0 for ints no key can equal. */
static int
as_key(PyObject *value, uint64_t *key, int *valid)
{
    if (!PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "PrefixLru keys are ints");
        return -1;
    }
    *key = PyLong_AsUnsignedLongLong(value);
    if (*key == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear(); /* negative or wider than 64 bits: never a key */
        *valid = 0;
        return 0;
    }
    *valid = 1;
    return 0;
}

static Py_ssize_t
PrefixLru_len(PrefixLru *self)
{
    return self->size;
}

static int
PrefixLru_contains(PrefixLru *self, PyObject *value)
{
    uint64_t key;
    int valid;
    if (as_key(value, &key, &valid) < 0)
        return -1;
    return valid && lru_contains(self, key);
}

/* A read-only uint64 buffer (a prompt's prefix hashes). */
static int
get_hashes(PyObject *object, Py_buffer *view)
{
    if (PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len % 8 != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "hashes must be a uint64 buffer");
        return -1;
    }
    return 0;
}

/* Leading blocks of a prompt (count prefix hashes) held: see cached_blocks_doc. */
static Py_ssize_t
lru_cached_blocks(const PrefixLru *lru, const uint64_t *hashes, Py_ssize_t count,
                  Py_ssize_t hint)
{
    Py_ssize_t hi = count, lo = 0;
    if (hi == 0 || !lru_contains(lru, hashes[0]))
        return 0;
    lo = 1; /* invariant: prefix lo is held, prefix hi + 1 is not */
    if (1 < hint && hint < hi) {
        if (!lru_contains(lru, hashes[hint - 1]))
            hi = hint - 1;
        else if (!lru_contains(lru, hashes[hint]))
            return hint;
        else
            lo = hint + 1;
    }
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi + 1) >> 1;
        if (lru_contains(lru, hashes[mid - 1]))
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

PyDoc_STRVAR(cached_blocks_doc,
"cached_blocks(hashes, hint=0) -> int\n\n"
"Leading blocks of a prompt whose prefix hashes (uint64 buffer) are held: a binary\n"
"search, valid because a view is closed under prefixes. Prefix 1 is probed first (the\n"
"common cold case), then, if 1 < hint < len, prefixes hint and hint + 1: with the right\n"
"hint the search takes 3 probes. The answer does not depend on the hint.");

static PyObject *
PrefixLru_cached_blocks(PrefixLru *self, PyObject *args)
{
    PyObject *object;
    Py_ssize_t hint = 0;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "O|n", &object, &hint))
        return NULL;
    if (get_hashes(object, &view) < 0)
        return NULL;
    Py_ssize_t blocks = lru_cached_blocks(self, (const uint64_t *)view.buf, view.len / 8, hint);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(blocks);
}

PyDoc_STRVAR(record_doc,
"record(hashes) -> None\n\n"
"A routed prompt's prefix hashes, touched tail first (the deepest block first, the first\n"
"block last, so it ends most recently used), then the least recently used entries\n"
"evicted down to capacity: deep blocks go before a shared head, as in the engine.");

static PyObject *
PrefixLru_record(PrefixLru *self, PyObject *object)
{
    Py_buffer view;
    if (get_hashes(object, &view) < 0)
        return NULL;
    const uint64_t *hashes = (const uint64_t *)view.buf;
    for (Py_ssize_t k = view.len / 8 - 1; k >= 0; k--) {
        if (touch(self, hashes[k]) == NO_ENTRY) {
            PyBuffer_Release(&view);
            evict(self);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    evict(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(add_doc,
"add(key) -> None\n\nOne more engine block maps to key (a precise view; no eviction).");

static PyObject *
PrefixLru_add(PrefixLru *self, PyObject *value)
{
    uint64_t key;
    int valid;
    if (as_key(value, &key, &valid) < 0)
        return NULL;
    if (!valid) {
        PyErr_SetString(PyExc_OverflowError, "PrefixLru keys are unsigned 64-bit ints");
        return NULL;
    }
    size_t i = find_slot(self, key);
    int32_t e = self->slots[i].entry;
    if (e != EMPTY_SLOT) {
        self->entries[e].count++;
        Py_RETURN_NONE;
    }
    if (touch(self, key) == NO_ENTRY)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(discard_doc,
"discard(key) -> None\n\nOne engine block fewer maps to key; gone at zero (absent: no-op).");

static PyObject *
PrefixLru_discard(PrefixLru *self, PyObject *value)
{
    uint64_t key;
    int valid;
    if (as_key(value, &key, &valid) < 0)
        return NULL;
    if (valid) {
        int32_t e = self->slots[find_slot(self, key)].entry;
        if (e != EMPTY_SLOT && --self->entries[e].count == 0)
            remove_entry(self, e);
    }
    Py_RETURN_NONE;
}

static PyObject *
PrefixLru_count(PrefixLru *self, PyObject *value)
{
    uint64_t key;
    int valid;
    if (as_key(value, &key, &valid) < 0)
        return NULL;
    if (!valid)
        return PyLong_FromLong(0);
    int32_t e = self->slots[find_slot(self, key)].entry;
    return PyLong_FromUnsignedLong(e == EMPTY_SLOT ? 0 : self->entries[e].count);
}

static PyObject *
PrefixLru_clear(PrefixLru *self, PyObject *Py_UNUSED(ignored))
{
    if (alloc_table(self, 6) < 0) /* the new, empty table first: on failure nothing changed */
        return NULL;
    reset(self);
    Py_RETURN_NONE;
}

static PyObject *
PrefixLru_keys(PrefixLru *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *keys = PyList_New(self->size);
    if (keys == NULL)
        return NULL;
    Py_ssize_t n = 0;
    for (int32_t e = self->head; e != NO_ENTRY; e = self->entries[e].next, n++) {
        PyObject *key = PyLong_FromUnsignedLongLong(self->entries[e].key);
        if (key == NULL) {
            Py_DECREF(keys);
            return NULL;
        }
        PyList_SET_ITEM(keys, n, key);
    }
    return keys;
}

static PyObject *
PrefixLru_get_capacity(PrefixLru *self, void *closure)
{
    return PyLong_FromSsize_t(self->capacity);
}

static int
PrefixLru_set_capacity(PrefixLru *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "capacity cannot be deleted");
        return -1;
    }
    Py_ssize_t capacity = PyLong_AsSsize_t(value);
    if (capacity == -1 && PyErr_Occurred())
        return -1;
    if (capacity < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
        return -1;
    }
    self->capacity = capacity;
    evict(self);
    return 0;
}

static PyMethodDef PrefixLru_methods[] = {
    {"cached_blocks", (PyCFunction)PrefixLru_cached_blocks, METH_VARARGS, cached_blocks_doc},
    {"record", (PyCFunction)PrefixLru_record, METH_O, record_doc},
    {"add", (PyCFunction)PrefixLru_add, METH_O, add_doc},
    {"discard", (PyCFunction)PrefixLru_discard, METH_O, discard_doc},
    {"count", (PyCFunction)PrefixLru_count, METH_O, "count(key) -> int: 0 if absent."},
    {"clear", (PyCFunction)PrefixLru_clear, METH_NOARGS, "clear() -> None: hold nothing."},
    {"keys", (PyCFunction)PrefixLru_keys, METH_NOARGS,
     "keys() -> list[int]: least recently used first."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef PrefixLru_getset[] = {
    {"capacity", (getter)PrefixLru_get_capacity, (setter)PrefixLru_set_capacity,
     "Most keys held; setting it evicts the least recently used beyond it.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods PrefixLru_as_sequence = {
    .sq_length = (lenfunc)PrefixLru_len,
    .sq_contains = (objobjproc)PrefixLru_contains,
};

static PyTypeObject PrefixLruType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router.policy._fastpath.PrefixLru",
    .tp_doc = PyDoc_STR("PrefixLru(capacity=unbounded): uint64 prefix hashes in LRU order."),
    .tp_basicsize = sizeof(PrefixLru),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PrefixLru_new,
    .tp_init = (initproc)PrefixLru_init,
    .tp_dealloc = (destructor)PrefixLru_dealloc,
    .tp_methods = PrefixLru_methods,
    .tp_getset = PrefixLru_getset,
    .tp_as_sequence = &PrefixLru_as_sequence,
};

#endif
