/* Compiled kernels of the routing decision path.
 *
 * The Python modules of router/policy own the rules and the state; these kernels do the
 * per-decision loops that cost far more interpreted than compiled (csrc/ holds the parts):
 *
 *   prefix_hashes  - the prefix-block hashes of a prompt (hashing.py states the function);
 *   key_hash, prompt_key, PromptKey
 *                  - ring keys, hot-prefix lengthening included (keys.py states the rule);
 *   RingIndex      - lookups on a consistent-hash ring (rings.py);
 *   PrefixLru      - one instance's set of cached prefix hashes (cache_view.py):
 *                    an open-addressing table of uint64 keys threaded on an LRU list, with
 *                    the binary search for a prompt's longest cached prefix and the
 *                    tail-first recording of a routed prompt as methods;
 *   LastHolderIndex - which instance each routed prefix last went to (DualMap's
 *                    continuity candidate), with its search;
 *   locate         - the above composed into one call per decision (ring_keys.py), since
 *                    every interpreted call on the decision path costs ~0.3-0.5 µs;
 *   affinity_pick  - DualMap's per-home TTFT estimates and affinity pick (dualmap.py).
 *
 * As Python dicts of ints, a view of 27k blocks per instance is ~150 bytes per block spread
 * over scattered objects: every probe of a search missed the CPU caches twice (the table,
 * then the key object), and recording an 8k-token prompt cost ~100 µs of interpreted
 * OrderedDict moves. Here a probe is one 16-byte slot and recording is ~512 probes in C.
 *
 * Nothing here reads a clock or does I/O. Buffers come in through the buffer protocol
 * (numpy arrays, array.array), so this file needs no numpy headers.
 *
 * Every rule here also exists in readable Python (fastpath_py.py), with the same results:
 * the reference tests/routing/test_fastpath.py holds these kernels to, and the fallback
 * where this extension is not built (router/policy/fastpath.py chooses). A change to a rule
 * is made in both.
 */
#include "csrc/common.h"
#include "csrc/hashing.h"
#include "csrc/lru.h"
#include "csrc/ring.h"
#include "csrc/holders.h"
#include "csrc/locate.h"
#include "csrc/affinity.h"

static PyObject *
fastpath_set_vector_kernels(PyObject *self, PyObject *value)
{
    int enable = PyObject_IsTrue(value);
    if (enable < 0)
        return NULL;
    int previous = use_vector_kernels;
    if (enable)
        detect_vector_kernels(); /* on only where the CPU has them */
    else
        use_vector_kernels = 0;
    return PyBool_FromLong(previous);
}

static PyObject *
fastpath_vector_kernels(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(use_vector_kernels);
}

static PyMethodDef fastpath_methods[] = {
    {"set_vector_kernels", fastpath_set_vector_kernels, METH_O,
     "set_vector_kernels(on) -> bool: use SIMD hashing where the CPU has it (the default)\n"
     "or not; returns the previous setting. The values are the same either way."},
    {"vector_kernels", fastpath_vector_kernels, METH_NOARGS,
     "vector_kernels() -> bool: whether prompt hashing uses a SIMD kernel."},
    {"mix64", fastpath_mix64, METH_O,
     "mix64(value): splitmix64's finaliser of value mod 2^64."},
    {"key_hash", fastpath_key_hash, METH_VARARGS, key_hash_doc},
    {"prompt_key", fastpath_prompt_key, METH_VARARGS, prompt_key_doc},
    {"locate", fastpath_locate, METH_VARARGS, locate_doc},
    {"affinity_pick", fastpath_affinity_pick, METH_VARARGS, affinity_pick_doc},
    {"xxh64", fastpath_xxh64, METH_VARARGS,
     "xxh64(data, seed=0) -> int: XXH64 of a bytes-like object (for tests)."},
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
    detect_vector_kernels();
    if (PyType_Ready(&PrefixLruType) < 0 || PyType_Ready(&RingIndexType) < 0
            || PyType_Ready(&LastHolderIndexType) < 0)
        return NULL;
    if (PromptKeyType == NULL) {
        PromptKeyType = PyStructSequence_NewType(&prompt_key_desc);
        if (PromptKeyType == NULL)
            return NULL;
    }
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&PrefixLruType);
    if (PyModule_AddObject(module, "PrefixLru", (PyObject *)&PrefixLruType) < 0) {
        Py_DECREF(&PrefixLruType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(PromptKeyType);
    if (PyModule_AddObject(module, "PromptKey", (PyObject *)PromptKeyType) < 0) {
        Py_DECREF(PromptKeyType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&RingIndexType);
    if (PyModule_AddObject(module, "RingIndex", (PyObject *)&RingIndexType) < 0) {
        Py_DECREF(&RingIndexType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&LastHolderIndexType);
    if (PyModule_AddObject(module, "LastHolderIndex", (PyObject *)&LastHolderIndexType) < 0) {
        Py_DECREF(&LastHolderIndexType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
