/* affinity_pick: DualMap's per-candidate estimates and affinity pick (dualmap.py states the
 * rule; the SLO switch on top of it stays in Python). The candidates: its two homes and,
 * where locate found one, the continuity candidate. */
#ifndef LLMFLEET_FASTPATH_AFFINITY_H
#define LLMFLEET_FASTPATH_AFFINITY_H

#include "common.h"

PyDoc_STRVAR(affinity_pick_doc,
"affinity_pick(homes, cached_blocks, index, fixed, queued, slope, block_size, num_tokens,\n"
"              key_length) -> (best, estimates)\n\n"
"For each candidate (one to three: c1, c2, then DualMap's continuity candidate):\n"
"i = index[candidate]; cached = min(cached_blocks * block_size, num_tokens - 1) (at least\n"
"0); ttft = fixed[i] + (queued[i] + num_tokens - cached) * slope[i], the predicted TTFT;\n"
"estimates holds (cached, ttft) per candidate. The pick is the larger cached prefix, ties\n"
"to the lower TTFT, then the earlier candidate; a cached prefix counts only if it covers\n"
"the key (cached >= key_length), else the candidate scores as cold with its uncached\n"
"TTFT. fixed, queued and slope are float64 arrays aligned with index.");

static PyObject *
fastpath_affinity_pick(PyObject *self, PyObject *args)
{
    PyObject *homes, *blocks, *index;
    Py_buffer fixed, queued, slope;
    Py_ssize_t block_size, num_tokens, key_length;
    if (!PyArg_ParseTuple(args, "O!O!O!y*y*y*nnn", &PyTuple_Type, &homes, &PyTuple_Type,
                          &blocks, &PyDict_Type, &index, &fixed, &queued, &slope, &block_size,
                          &num_tokens, &key_length))
        return NULL;
    PyObject *result = NULL, *estimates = NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(homes);
    Py_ssize_t size = fixed.len / 8;
    if (count < 1 || count > 3 || PyTuple_GET_SIZE(blocks) != count || queued.len / 8 != size
            || slope.len / 8 != size) {
        PyErr_SetString(PyExc_ValueError,
                        "affinity_pick: one to three candidates, aligned arrays");
        goto done;
    }
    const double *f = (const double *)fixed.buf, *q = (const double *)queued.buf;
    const double *s = (const double *)slope.buf;
    Py_ssize_t most_cached = num_tokens > 1 ? num_tokens - 1 : 0;
    double score_cached[3], score_ttft[3];
    estimates = PyTuple_New(count);
    if (estimates == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *position = PyDict_GetItemWithError(index, PyTuple_GET_ITEM(homes, k));
        if (position == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, PyTuple_GET_ITEM(homes, k));
            goto done;
        }
        Py_ssize_t i = PyLong_AsSsize_t(position);
        Py_ssize_t held = PyLong_AsSsize_t(PyTuple_GET_ITEM(blocks, k));
        if ((i == -1 || held == -1) && PyErr_Occurred())
            goto done;
        if (i < 0 || i >= size) {
            PyErr_SetString(PyExc_IndexError, "affinity_pick: index past the arrays");
            goto done;
        }
        Py_ssize_t cached = held * block_size < most_cached ? held * block_size : most_cached;
        double ttft = f[i] + (q[i] + (double)(num_tokens - cached)) * s[i];
        if (cached >= key_length) {
            score_cached[k] = -(double)cached;
            score_ttft[k] = ttft;
        } else { /* cold for this key: its TTFT as if nothing were cached */
            score_cached[k] = 0.0;
            score_ttft[k] = f[i] + (q[i] + (double)num_tokens) * s[i];
        }
        PyObject *estimate = Py_BuildValue("(nd)", cached, ttft);
        if (estimate == NULL)
            goto done;
        PyTuple_SET_ITEM(estimates, k, estimate);
    }
    int best = 0;
    for (int k = 1; k < count; k++) {
        if (score_cached[k] < score_cached[best]
                || (score_cached[k] == score_cached[best] && score_ttft[k] < score_ttft[best]))
            best = k;
    }
    result = Py_BuildValue("(iO)", best, estimates);
done:
    Py_XDECREF(estimates);
    PyBuffer_Release(&fixed);
    PyBuffer_Release(&queued);
    PyBuffer_Release(&slope);
    return result;
}

#endif
