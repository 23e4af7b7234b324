#ifndef LLMFLEET_FASTPATH_RING_H
#define LLMFLEET_FASTPATH_RING_H

#include "common.h"

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

/* See ring_first_doc. */
static long
ring_first(const RingIndex *self, uint64_t position, const unsigned char *eligible,
           Py_ssize_t labels, int exclude)
{
    Py_ssize_t count = self->count;
    if (!count)
        return -1;
    Py_ssize_t start = ring_index(self, position);
    if (start == count)
        start = 0;
    int32_t owner = self->owners[start];
    if (owner == exclude) {
        start = self->next_distinct[start];
        owner = self->owners[start];
    }
    if (owner != exclude && owner >= 0 && owner < labels && eligible[owner])
        return owner;
    for (Py_ssize_t step = 1; step < count; step++) {
        owner = self->owners[(start + step) % count];
        if (owner != exclude && owner >= 0 && owner < labels && eligible[owner])
            return owner;
    }
    return -1;
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
    if (parse_position(value, &position) < 0) {
        PyBuffer_Release(&mask);
        return NULL;
    }
    long found = ring_first(self, position, (const unsigned char *)mask.buf, mask.len, exclude);
    PyBuffer_Release(&mask);
    return PyLong_FromLong(found);
}

static Py_ssize_t
RingIndex_len(RingIndex *self)
{
    return self->count;
}

/* A point index in range, or -1 with IndexError (or the int conversion's error) set. */
static Py_ssize_t
parse_point(const RingIndex *self, PyObject *value)
{
    Py_ssize_t index = PyLong_AsSsize_t(value);
    if (index == -1 && PyErr_Occurred())
        return -1;
    if (index < 0 || index >= self->count) {
        PyErr_SetString(PyExc_IndexError, "RingIndex: point out of range");
        return -1;
    }
    return index;
}

static PyObject *
RingIndex_next_distinct(RingIndex *self, PyObject *value)
{
    Py_ssize_t index = parse_point(self, value);
    return index < 0 ? NULL : PyLong_FromUnsignedLong(self->next_distinct[index]);
}

static PyMethodDef RingIndex_methods[] = {
    {"first", (PyCFunction)RingIndex_first, METH_VARARGS, ring_first_doc},
    {"index", (PyCFunction)RingIndex_index, METH_O,
     "index(position) -> int: the first point at or after position (len past the last)."},
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

#endif
