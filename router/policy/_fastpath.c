/* Compiled kernels of the routing decision path (router.policy.fastpath wraps them).
 *
 * Two loops run on every routing decision and cost far more interpreted than compiled:
 *
 *   prefix_hashes  - the prefix-block hashes of a prompt (router/policy/hashing.py states
 *                    the function; this computes exactly the same values in one pass);
 *   RingIndex      - lookups on a consistent-hash ring (router/policy/rings.py).
 *   PrefixLru      - one instance's set of cached prefix hashes (router/policy/cache_view.py):
 *                    an open-addressing table of uint64 keys threaded on an LRU list, with
 *                    the binary search for a prompt's longest cached prefix and the
 *                    tail-first recording of a routed prompt as methods.
 *
 * As Python dicts of ints, a view of 27k blocks per instance is ~150 bytes per block spread
 * over scattered objects: every probe of a search missed the CPU caches twice (the table,
 * then the key object), and recording an 8k-token prompt cost ~100 µs of interpreted
 * OrderedDict moves. Here a probe is one 16-byte slot and recording is ~512 probes in C.
 *
 * Nothing here reads a clock or does I/O. Buffers come in through the buffer protocol
 * (numpy arrays, array.array), so this file needs no numpy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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
    {
        const unsigned char *src = (const unsigned char *)tokens.buf;
        const uint64_t *m = (const uint64_t *)mult.buf;
        const uint64_t *s = (const uint64_t *)salt.buf + salt_start;
        uint64_t *dst = (uint64_t *)out.buf;
        uint64_t running = (uint64_t)start_prefix;
        /* The GIL stays held: releasing it costs more than the loop and could hand the
         * interpreter to another thread in the middle of a decision. */
        if (words_per_block == 8) { /* 16-token blocks: the usual case, unrolled */
            for (Py_ssize_t k = 0; k < blocks; k++, src += 64) {
                uint64_t w[8];
                memcpy(w, src, 64); /* unaligned-safe; little-endian only (hashing.py) */
                uint64_t block = w[0] * m[0] + w[1] * m[1] + w[2] * m[2] + w[3] * m[3]
                               + w[4] * m[4] + w[5] * m[5] + w[6] * m[6] + w[7] * m[7];
                running += block ^ s[k];
                dst[k] = running;
            }
        } else {
            for (Py_ssize_t k = 0; k < blocks; k++) {
                uint64_t block = 0;
                for (Py_ssize_t w = 0; w < words_per_block; w++, src += 8) {
                    uint64_t word;
                    memcpy(&word, src, 8);
                    block += word * m[w];
                }
                running += block ^ s[k];
                dst[k] = running;
            }
        }
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&mult);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&out);
    return result;
}

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
    const uint64_t *hashes = (const uint64_t *)view.buf;
    Py_ssize_t hi = view.len / 8;
    Py_ssize_t lo = 0;
    if (hi > 0 && lru_contains(self, hashes[0])) {
        lo = 1; /* invariant: prefix lo is held, prefix hi + 1 is not */
        if (1 < hint && hint < hi) {
            if (!lru_contains(self, hashes[hint - 1]))
                hi = hint - 1;
            else if (!lru_contains(self, hashes[hint]))
                lo = hi = hint;
            else
                lo = hint + 1;
        }
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi + 1) >> 1;
            if (lru_contains(self, hashes[mid - 1]))
                lo = mid;
            else
                hi = mid - 1;
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(lo);
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
    reset(self);
    if (alloc_table(self, 6) < 0)
        return NULL;
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

/* ---- RingIndex ---------------------------------------------------------------------------
 *
 * The lookup side of a consistent-hash ring (router/policy/rings.py builds the points):
 * sorted uint64 positions, each with an owner label (a small int: the member's slot).
 * Built once per membership change; O(1) average lookups:
 *
 *   - a bucket index over the top bits of the positions (2^bits > points buckets, so about
 *     one point per bucket): finding the first point at or after a position is one table
 *     read and a short scan;
 *   - per point, the next point clockwise with a different owner, so the next distinct
 *     member (DualMap's ring B when it gives c1) costs one more read instead of a walk.
 */

typedef struct {
    PyObject_HEAD
    uint64_t *positions;
    int32_t *owners;
    uint32_t *bucket_start; /* buckets + 1 entries */
    uint32_t *next_distinct;
    Py_ssize_t count;
    int shift;
} RingIndex;

static PyObject *
RingIndex_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    RingIndex *self = (RingIndex *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->positions = NULL;
        self->owners = NULL;
        self->bucket_start = NULL;
        self->next_distinct = NULL;
        self->count = 0;
        self->shift = 63;
    }
    return (PyObject *)self;
}

static void
RingIndex_dealloc(RingIndex *self)
{
    PyMem_Free(self->positions);
    PyMem_Free(self->owners);
    PyMem_Free(self->bucket_start);
    PyMem_Free(self->next_distinct);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
RingIndex_init(RingIndex *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"positions", "owners", NULL};
    PyObject *positions_object, *owners_object;
    Py_buffer positions, owners;
    if (self->positions != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RingIndex is immutable");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &positions_object,
                                     &owners_object))
        return -1;
    if (PyObject_GetBuffer(positions_object, &positions, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (PyObject_GetBuffer(owners_object, &owners, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&positions);
        return -1;
    }
    int result = -1;
    Py_ssize_t count = positions.len / 8;
    if (positions.len % 8 || owners.len != count * 4 || count >= (Py_ssize_t)UINT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError,
                        "RingIndex: positions (uint64) and owners (int32) must pair up");
        goto done;
    }
    const uint64_t *pos = (const uint64_t *)positions.buf;
    for (Py_ssize_t i = 1; i < count; i++) {
        if (pos[i - 1] > pos[i]) {
            PyErr_SetString(PyExc_ValueError, "RingIndex: positions must be sorted");
            goto done;
        }
    }
    int bits = 1;
    while (((Py_ssize_t)1 << bits) <= count)
        bits++;
    Py_ssize_t buckets = (Py_ssize_t)1 << bits;
    self->count = count;
    self->shift = 64 - bits;
    self->positions = PyMem_Malloc((count ? count : 1) * sizeof(uint64_t));
    self->owners = PyMem_Malloc((count ? count : 1) * sizeof(int32_t));
    self->next_distinct = PyMem_Malloc((count ? count : 1) * sizeof(uint32_t));
    self->bucket_start = PyMem_Malloc((buckets + 1) * sizeof(uint32_t));
    if (!self->positions || !self->owners || !self->next_distinct || !self->bucket_start) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(self->positions, pos, count * sizeof(uint64_t));
    memcpy(self->owners, owners.buf, count * sizeof(int32_t));
    /* bucket_start[b]: the first point whose position is >= b << shift. */
    Py_ssize_t i = 0;
    for (Py_ssize_t b = 0; b < buckets; b++) {
        uint64_t floor = (uint64_t)b << self->shift;
        while (i < count && pos[i] < floor)
            i++;
        self->bucket_start[b] = (uint32_t)i;
    }
    self->bucket_start[buckets] = (uint32_t)count;
    /* next_distinct, circularly: two backward sweeps settle the wrap-around. */
    if (count) {
        const int32_t *own = self->owners;
        for (Py_ssize_t k = 0; k < count; k++)
            self->next_distinct[k] = (uint32_t)k; /* no other owner anywhere: itself */
        for (int sweep = 0; sweep < 2; sweep++) {
            for (Py_ssize_t k = count - 1; k >= 0; k--) {
                Py_ssize_t after = (k + 1) % count;
                if (own[after] != own[k])
                    self->next_distinct[k] = (uint32_t)after;
                else if (own[self->next_distinct[after]] != own[k])
                    self->next_distinct[k] = self->next_distinct[after];
            }
        }
    }
    result = 0;
done:
    PyBuffer_Release(&positions);
    PyBuffer_Release(&owners);
    return result;
}

/* Index of the first point at or after position (count past the last). */
static inline Py_ssize_t
ring_index(const RingIndex *self, uint64_t position)
{
    uint64_t bucket = position >> self->shift;
    Py_ssize_t i = self->bucket_start[bucket];
    Py_ssize_t end = self->bucket_start[bucket + 1];
    while (i < end && self->positions[i] < position)
        i++;
    return i;
}

static int
parse_position(PyObject *value, uint64_t *position)
{
    *position = PyLong_AsUnsignedLongLong(value);
    if (*position == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

static PyObject *
RingIndex_index(RingIndex *self, PyObject *value)
{
    uint64_t position;
    if (parse_position(value, &position) < 0)
        return NULL;
    return PyLong_FromSsize_t(self->count ? ring_index(self, position) : 0);
}

PyDoc_STRVAR(ring_first_doc,
"first(position, eligible, exclude=-1) -> int\n\n"
"The owner label of the first point clockwise from position whose owner is eligible\n"
"(eligible[label] != 0, a bytes-like mask) and is not exclude; -1 if there is none.\n"
"The owner, then the next distinct owner, are tried in O(1); past them the ring is\n"
"walked point by point.");

static PyObject *
RingIndex_first(RingIndex *self, PyObject *args)
{
    PyObject *value;
    Py_buffer mask;
    int exclude = -1;
    if (!PyArg_ParseTuple(args, "Oy*|i", &value, &mask, &exclude))
        return NULL;
    uint64_t position;
    long found = -1;
    if (parse_position(value, &position) < 0) {
        PyBuffer_Release(&mask);
        return NULL;
    }
    const unsigned char *eligible = (const unsigned char *)mask.buf;
    Py_ssize_t labels = mask.len;
    Py_ssize_t count = self->count;
    if (count) {
        Py_ssize_t start = ring_index(self, position);
        if (start == count)
            start = 0;
        int32_t owner = self->owners[start];
        if (owner == exclude) {
            start = self->next_distinct[start];
            owner = self->owners[start];
        }
        if (owner != exclude && owner >= 0 && owner < labels && eligible[owner]) {
            found = owner;
        } else {
            for (Py_ssize_t step = 1; step < count; step++) {
                owner = self->owners[(start + step) % count];
                if (owner != exclude && owner >= 0 && owner < labels && eligible[owner]) {
                    found = owner;
                    break;
                }
            }
        }
    }
    PyBuffer_Release(&mask);
    return PyLong_FromLong(found);
}

static Py_ssize_t
RingIndex_len(RingIndex *self)
{
    return self->count;
}

static PyObject *
RingIndex_owner_at(RingIndex *self, PyObject *value)
{
    Py_ssize_t index = PyLong_AsSsize_t(value);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= self->count) {
        PyErr_SetString(PyExc_IndexError, "RingIndex: point out of range");
        return NULL;
    }
    return PyLong_FromLong(self->owners[index]);
}

static PyObject *
RingIndex_next_distinct(RingIndex *self, PyObject *value)
{
    Py_ssize_t index = PyLong_AsSsize_t(value);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= self->count) {
        PyErr_SetString(PyExc_IndexError, "RingIndex: point out of range");
        return NULL;
    }
    return PyLong_FromUnsignedLong(self->next_distinct[index]);
}

static PyMethodDef RingIndex_methods[] = {
    {"first", (PyCFunction)RingIndex_first, METH_VARARGS, ring_first_doc},
    {"index", (PyCFunction)RingIndex_index, METH_O,
     "index(position) -> int: the first point at or after position (len past the last)."},
    {"owner_at", (PyCFunction)RingIndex_owner_at, METH_O,
     "owner_at(point) -> int: the owner label of a point."},
    {"next_distinct", (PyCFunction)RingIndex_next_distinct, METH_O,
     "next_distinct(point) -> int: the next point clockwise with another owner (itself\n"
     "if the ring has one owner)."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods RingIndex_as_sequence = {
    .sq_length = (lenfunc)RingIndex_len,
};

static PyTypeObject RingIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router.policy._fastpath.RingIndex",
    .tp_doc = PyDoc_STR("RingIndex(positions, owners): lookups on a consistent-hash ring."),
    .tp_basicsize = sizeof(RingIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = RingIndex_new,
    .tp_init = (initproc)RingIndex_init,
    .tp_dealloc = (destructor)RingIndex_dealloc,
    .tp_methods = RingIndex_methods,
    .tp_as_sequence = &RingIndex_as_sequence,
};

/* splitmix64's finaliser: spreads a structured 64-bit hash over all 64 bits. */
static inline uint64_t
mix64_value(uint64_t value)
{
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9ULL;
    value = (value ^ (value >> 27)) * 0x94D049BB133111EBULL;
    return value ^ (value >> 31);
}

static PyObject *
fastpath_mix64(PyObject *self, PyObject *value)
{
    uint64_t x = PyLong_AsUnsignedLongLongMask(value);
    if (x == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(mix64_value(x));
}

/* mix64_at(hashes, index): mix64(hashes[index]) of a uint64 buffer (a ring key from a
 * prompt's prefix hashes without making the intermediate Python int). */
static PyObject *
fastpath_mix64_at(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t index;
    if (!PyArg_ParseTuple(args, "y*n", &view, &index))
        return NULL;
    Py_ssize_t count = view.len / 8;
    if (index < 0 || index >= count) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_IndexError, "mix64_at: index out of range");
        return NULL;
    }
    uint64_t x;
    memcpy(&x, (const char *)view.buf + 8 * index, 8);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(mix64_value(x));
}

static PyMethodDef fastpath_methods[] = {
    {"mix64", fastpath_mix64, METH_O,
     "mix64(value): splitmix64's finaliser of value mod 2^64."},
    {"mix64_at", fastpath_mix64_at, METH_VARARGS,
     "mix64_at(hashes, index): mix64 of hashes[index] (a uint64 buffer)."},
    {"prefix_hashes", fastpath_prefix_hashes, METH_VARARGS,
     "prefix_hashes(tokens, mult, salt, out, start_prefix): prefix-block hashes into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "router.policy._fastpath",
    "Compiled kernels of the routing decision path.", -1, fastpath_methods, NULL, NULL, NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&PrefixLruType) < 0 || PyType_Ready(&RingIndexType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&PrefixLruType);
    if (PyModule_AddObject(module, "PrefixLru", (PyObject *)&PrefixLruType) < 0) {
        Py_DECREF(&PrefixLruType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&RingIndexType);
    if (PyModule_AddObject(module, "RingIndex", (PyObject *)&RingIndexType) < 0) {
        Py_DECREF(&RingIndexType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
