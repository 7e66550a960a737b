/* kcons._idgen: the C form of kcons.ids' UUIDv7 generator (optional; see kcons/ids.py).
 *
 * When it is built, kcons.ids.fast_event_id is its event_id(), the package's one generator: the
 * same ids as the Python generator in kcons/ids.py, which stays the reference, at a fraction of
 * the cost per call. It is its own module (not part of kcons.kafka._speedups) so that kcons.ids
 * loads it without loading the Kafka layer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>
#ifndef _WIN32
#include <pthread.h>
#endif

/* event_id(): a fresh UUIDv7 in canonical text, as bytes: the same ids as kcons.ids' Python
 * generator (RFC 9562 layout: 48-bit Unix milliseconds, version 7, a 12-bit sequence within the
 * millisecond, the variant and 62 random bits drawn once per millisecond). The text of a
 * millisecond is built once; each id writes its three sequence digits into it. When the 4096 ids
 * of a millisecond are used up, or the clock went back, the ids go on in the next millisecond, so
 * they increase across threads too. No Python code runs between reading and advancing the state,
 * so the GIL makes each call atomic. */
static PyObject *urandom = NULL; /* os.urandom: 8 bytes per millisecond */
static long long id_ms = -1;     /* the millisecond of the current text */
static int id_seq = 4096;        /* the next sequence number in it (4096: used up) */
static char id_text[36];
static const char hexdigits[] = "0123456789abcdef";

static void
put_hex(char *out, unsigned long long v, int digits)
{
    for (int i = digits - 1; i >= 0; i--) {
        out[i] = hexdigits[v & 0xF];
        v >>= 4;
    }
}

static PyObject *
draw_event_id(PyObject *module, PyObject *unused)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long now = (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    if (now > id_ms || id_seq >= 4096) {
        long long ms = now > id_ms ? now : id_ms + 1; /* a new millisecond, or the next one borrowed */
        PyObject *rand = PyObject_CallFunction(urandom, "i", 8);
        if (rand == NULL) {
            return NULL;
        }
        if (!PyBytes_Check(rand) || PyBytes_GET_SIZE(rand) != 8) {
            Py_DECREF(rand);
            PyErr_SetString(PyExc_RuntimeError, "os.urandom(8) did not return 8 bytes");
            return NULL;
        }
        unsigned long long low = 0;
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(rand);
        for (int i = 0; i < 8; i++) {
            low = low << 8 | b[i];
        }
        Py_DECREF(rand);
        if (ms <= id_ms && id_seq < 4096) {
            /* os.urandom let another thread in, and it moved on: draw from its millisecond. */
            goto draw;
        }
        if (ms <= id_ms) {
            ms = id_ms + 1;
        }
        low = (2ULL << 62) | (low & ((1ULL << 62) - 1)); /* variant 10, 62 random bits */
        unsigned long long ms48 = (unsigned long long)ms & 0xFFFFFFFFFFFFULL;
        put_hex(id_text, ms48 >> 16, 8);
        id_text[8] = '-';
        put_hex(id_text + 9, ms48 & 0xFFFF, 4);
        id_text[13] = '-';
        id_text[14] = '7';
        id_text[18] = '-';
        put_hex(id_text + 19, low >> 48, 4);
        id_text[23] = '-';
        put_hex(id_text + 24, low & 0xFFFFFFFFFFFFULL, 12);
        id_ms = ms;
        id_seq = 0;
    }
draw:
    put_hex(id_text + 15, (unsigned long long)id_seq, 3);
    id_seq++;
    return PyBytes_FromStringAndSize(id_text, 36);
}


/* In a forked child the next id starts a new millisecond with its own random bits: without that,
 * parent and child would draw the same ids for the rest of the millisecond of the fork. */
static void
forget_after_fork(void)
{
    id_seq = 4096;
}

static PyMethodDef module_methods[] = {
    {"event_id", (PyCFunction)draw_event_id, METH_NOARGS, "Return a fresh UUIDv7 (canonical text, as header bytes)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kcons._idgen",
    .m_doc = "The C form of kcons.ids' UUIDv7 generator.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__idgen(void)
{
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    if (urandom == NULL) {
        PyObject *os = PyImport_ImportModule("os");
        urandom = os == NULL ? NULL : PyObject_GetAttrString(os, "urandom");
        Py_XDECREF(os);
        if (urandom == NULL) {
            Py_DECREF(m);
            return NULL;
        }
    }
#ifndef _WIN32
    if (pthread_atfork(NULL, NULL, forget_after_fork) != 0) {
        Py_DECREF(m);
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
#endif
    /* What kcons.ids expects (IDGEN_API there): a stale build of an older source is not used. */
    if (PyModule_AddIntConstant(m, "API", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
