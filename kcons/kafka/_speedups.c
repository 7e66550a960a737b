/* kcons.kafka._speedups: the per-message path of produce() in C (optional; see kcons/kafka/futures.py).
 *
 * Three types, each the C form of a Python class that stays the reference implementation:
 *
 *  - TrackerBase: the fields of DeliveryTracker (pending set, delivered count, on_report), so that
 *    a delivery report reaches them without attribute lookups;
 *  - the DeliveryFuture layout (make_type): its delivery callback (__call__, with vectorcall) in C,
 *    every other method copied from the Python class by kcons.kafka.futures;
 *  - FastProduce: the common case of producer.produce() (no headers of the caller's, no delivery
 *    callback, the producer open) in one C call; everything else goes to the Python method.
 *
 * The future a FastProduce makes is not tracked by the garbage collector: it holds only atoms (a
 * str topic, bytes key, value and event id, ints) and a weak reference to its tracker, so it can be
 * in no reference cycle, and keeping many of them costs no collection time. Anything that may
 * hold a container (a linked standard future, a failure, a value set from Python) tracks it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <structmember.h>

/* ---- TrackerBase ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *pending;
    Py_ssize_t delivered;
    PyObject *on_report;
    PyObject *weakreflist;
} Tracker;

static PyTypeObject *tracker_type = NULL;

static int
tracker_traverse(Tracker *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->pending);
    Py_VISIT(self->on_report);
    return 0;
}

static int
tracker_clear(Tracker *self)
{
    Py_CLEAR(self->pending);
    Py_CLEAR(self->on_report);
    return 0;
}

static void
tracker_dealloc(Tracker *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    tracker_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef tracker_members[] = {
    {"pending", T_OBJECT_EX, offsetof(Tracker, pending), 0, "The futures awaiting their delivery report (a set)."},
    {"delivered", T_PYSSIZET, offsetof(Tracker, delivered), 0, "Successes not yet counted in metrics."},
    {"on_report", T_OBJECT_EX, offsetof(Tracker, on_report), 0, "Settles a report that is not a plain success."},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Tracker, weakreflist), READONLY},
    {NULL},
};

static PyType_Slot tracker_slots[] = {
    {Py_tp_dealloc, tracker_dealloc},
    {Py_tp_traverse, tracker_traverse},
    {Py_tp_clear, tracker_clear},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_members, tracker_members},
    {Py_tp_doc, "The fields of a DeliveryTracker, in C (kcons.kafka.futures.DeliveryTracker adds its methods)."},
    {0, NULL},
};

static PyType_Spec tracker_spec = {
    .name = "kcons.kafka._speedups.TrackerBase",
    .basicsize = sizeof(Tracker),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = tracker_slots,
};

/* ---- DeliveryFuture ---------------------------------------------------------------------- */

/* Which of the offset and timestamp fields hold a value, and which of them hold None. */
#define HAS_OFFSET 1
#define OFFSET_NONE 2
#define HAS_TIMESTAMP 4
#define TIMESTAMP_NONE 8

typedef struct Fut {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *future;
    PyObject *headers;
    PyObject *key;
    PyObject *outcome;
    PyObject *topic;
    PyObject *tracker; /* a weak reference to the DeliveryTracker, or NULL */
    PyObject *value;
    PyObject *partition;
    PyObject *timestamp_type;
    long long offset;
    long long timestamp;
    int has;
    /* Membership of a PendingSet (which holds a reference to each member): borrowed pointers. */
    struct PendingSet *owner;
    struct Fut *prev;
    struct Fut *next;
} Fut;

/* Set once by make_type(): the type, the two outcome sentinels. */
static PyTypeObject *fut_type = NULL;
/* Futures alive (of the type and its subclasses): the collector does not list untracked ones. */
static Py_ssize_t live = 0;
static PyObject *UNSET = NULL;
static PyObject *DELIVERED = NULL;
static PyObject *s_pending, *s_delivered, *s_partition, *s_offset, *s_timestamp, *s_report, *s_publish, *s_closed,
    *s_raw, *s_produce, *s_partition_kw, *s_headers_kw, *s_on_delivery_kw, *s_block_kw, *s_key_kw, *minus_one, *zero, *one;


/* ---- PendingSet -------------------------------------------------------------------------- */

/* The futures of a tracker awaiting their report: the operations of a set that the tracker and the
 * producer use (add, remove, discard, pop, update, in, len, iteration over a copy), as a list
 * threaded through the futures themselves. Adding and taking out touch only the future and its
 * neighbours (made one after the other, so next to each other in memory), where a hash set
 * touches a slot of a table as large as the number of messages in flight. */
typedef struct PendingSet {
    PyObject_HEAD
    Fut *head;
    Fut *tail;
    Py_ssize_t size;
} PendingSet;

static PyTypeObject *pending_type = NULL;
static PyObject *s_add, *s_remove;

/* Take ``fut`` (a member) out of the set; the set's reference to it is returned to the caller. */
static Fut *
pending_unlink(PendingSet *set, Fut *fut)
{
    if (fut->prev != NULL) {
        fut->prev->next = fut->next;
    } else {
        set->head = fut->next;
    }
    if (fut->next != NULL) {
        fut->next->prev = fut->prev;
    } else {
        set->tail = fut->prev;
    }
    fut->prev = fut->next = NULL;
    fut->owner = NULL;
    set->size--;
    return fut;
}

static int
pending_append(PendingSet *set, PyObject *obj)
{
    if (fut_type == NULL || !PyObject_TypeCheck(obj, fut_type)) {
        PyErr_Format(PyExc_TypeError, "a PendingSet holds DeliveryFutures, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    Fut *fut = (Fut *)obj;
    if (fut->owner == set) {
        return 0;
    }
    if (fut->owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the future is pending in another tracker's set");
        return -1;
    }
    Py_INCREF(fut);
    fut->owner = set;
    fut->prev = set->tail;
    fut->next = NULL;
    if (set->tail != NULL) {
        set->tail->next = fut;
    } else {
        set->head = fut;
    }
    set->tail = fut;
    set->size++;
    return 0;
}

static int
pending_has(PendingSet *set, PyObject *obj)
{
    return fut_type != NULL && PyObject_TypeCheck(obj, fut_type) && ((Fut *)obj)->owner == set;
}

/* Add ``fut`` to a tracker's pending container: a PendingSet, a set, or anything with add(). */
static int
pending_add(PyObject *pending, PyObject *fut)
{
    if (Py_IS_TYPE(pending, pending_type)) {
        return pending_append((PendingSet *)pending, fut);
    }
    if (PyAnySet_Check(pending)) {
        return PySet_Add(pending, fut);
    }
    PyObject *r = PyObject_CallMethodOneArg(pending, s_add, fut);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* Take ``fut`` out of a tracker's pending container: 1 when it was there, 0 when not, -1 on error. */
static int
pending_discard(PyObject *pending, PyObject *fut)
{
    if (Py_IS_TYPE(pending, pending_type)) {
        if (!pending_has((PendingSet *)pending, fut)) {
            return 0;
        }
        Py_DECREF(pending_unlink((PendingSet *)pending, (Fut *)fut));
        return 1;
    }
    if (PyAnySet_Check(pending)) {
        return PySet_Discard(pending, fut);
    }
    PyObject *r = PyObject_CallMethodOneArg(pending, s_remove, fut);
    if (r != NULL) {
        Py_DECREF(r);
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

static PyObject *
ps_add(PendingSet *self, PyObject *fut)
{
    if (pending_append(self, fut) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
ps_remove(PendingSet *self, PyObject *fut)
{
    if (!pending_has(self, fut)) {
        PyErr_SetObject(PyExc_KeyError, fut);
        return NULL;
    }
    Py_DECREF(pending_unlink(self, (Fut *)fut));
    Py_RETURN_NONE;
}

static PyObject *
ps_discard(PendingSet *self, PyObject *fut)
{
    if (pending_has(self, fut)) {
        Py_DECREF(pending_unlink(self, (Fut *)fut));
    }
    Py_RETURN_NONE;
}

static PyObject *
ps_pop(PendingSet *self, PyObject *unused)
{
    if (self->head == NULL) {
        PyErr_SetString(PyExc_KeyError, "pop from an empty set");
        return NULL;
    }
    return (PyObject *)pending_unlink(self, self->head);
}

static PyObject *
ps_update(PendingSet *self, PyObject *iterable)
{
    PyObject *it = PyObject_GetIter(iterable);
    if (it == NULL) {
        return NULL;
    }
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        int r = pending_append(self, item);
        Py_DECREF(item);
        if (r < 0) {
            Py_DECREF(it);
            return NULL;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The members, oldest first, as a new list. */
static PyObject *
ps_members(PendingSet *self)
{
    for (;;) {
        Py_ssize_t n = self->size;
        PyObject *list = PyList_New(n);
        if (list == NULL) {
            return NULL;
        }
        if (self->size != n) {
            /* The allocation ran a collection whose finalizers changed the set: size it again. */
            Py_DECREF(list);
            continue;
        }
        Py_ssize_t i = 0;
        for (Fut *f = self->head; f != NULL && i < n; f = f->next, i++) {
            Py_INCREF(f);
            PyList_SET_ITEM(list, i, (PyObject *)f);
        }
        return list;
    }
}

static PyObject *
ps_iter(PendingSet *self)
{
    PyObject *list = ps_members(self);
    if (list == NULL) {
        return NULL;
    }
    PyObject *it = PyObject_GetIter(list);
    Py_DECREF(list);
    return it;
}

static Py_ssize_t
ps_len(PendingSet *self)
{
    return self->size;
}

static int
ps_contains(PendingSet *self, PyObject *obj)
{
    return pending_has(self, obj);
}

static int
ps_traverse(PendingSet *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    for (Fut *f = self->head; f != NULL; f = f->next) {
        Py_VISIT(f);
    }
    return 0;
}

static int
ps_clear(PendingSet *self)
{
    while (self->head != NULL) {
        Py_DECREF(pending_unlink(self, self->head));
    }
    return 0;
}

static void
ps_dealloc(PendingSet *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    ps_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
ps_repr(PendingSet *self)
{
    return PyUnicode_FromFormat("<PendingSet of %zd>", self->size);
}

static PyMethodDef ps_methods[] = {
    {"add", (PyCFunction)ps_add, METH_O, "Add a pending future (once)."},
    {"remove", (PyCFunction)ps_remove, METH_O, "Take a future out; KeyError when it is not in the set."},
    {"discard", (PyCFunction)ps_discard, METH_O, "Take a future out if it is in the set."},
    {"pop", (PyCFunction)ps_pop, METH_NOARGS, "Take the oldest future out; KeyError when the set is empty."},
    {"update", (PyCFunction)ps_update, METH_O, "Add every future of an iterable."},
    {NULL},
};

static PyType_Slot ps_slots[] = {
    {Py_tp_dealloc, ps_dealloc},
    {Py_tp_traverse, ps_traverse},
    {Py_tp_clear, ps_clear},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_iter, ps_iter},
    {Py_tp_repr, ps_repr},
    {Py_tp_methods, ps_methods},
    {Py_sq_length, ps_len},
    {Py_sq_contains, ps_contains},
    {Py_tp_doc, "The futures of a DeliveryTracker awaiting their delivery report (a set of futures)."},
    {0, NULL},
};

static PyType_Spec ps_spec = {
    .name = "kcons.kafka._speedups.PendingSet",
    .basicsize = sizeof(PendingSet),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = ps_slots,
};

static int
fut_traverse(Fut *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->future);
    Py_VISIT(self->headers);
    Py_VISIT(self->key);
    Py_VISIT(self->outcome);
    Py_VISIT(self->topic);
    Py_VISIT(self->tracker);
    Py_VISIT(self->value);
    Py_VISIT(self->partition);
    Py_VISIT(self->timestamp_type);
    return 0;
}

static int
fut_clear(Fut *self)
{
    Py_CLEAR(self->future);
    Py_CLEAR(self->headers);
    Py_CLEAR(self->key);
    Py_CLEAR(self->outcome);
    Py_CLEAR(self->topic);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->value);
    Py_CLEAR(self->partition);
    Py_CLEAR(self->timestamp_type);
    return 0;
}

static void
fut_dealloc(Fut *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, fut_dealloc)
    live--;
    fut_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
    Py_TRASHCAN_END
}

static void
set_slot(PyObject **slot, PyObject *value)
{
    PyObject *old = *slot;
    Py_XINCREF(value);
    *slot = value;
    Py_XDECREF(old);
}

/* The tracker of a future (a new reference), or None once it is settled or the tracker is gone. */
static PyObject *
fut_tracker(Fut *self)
{
    if (self->tracker == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *t = PyWeakref_GetObject(self->tracker);
    if (t == NULL) {
        return NULL;
    }
    Py_INCREF(t);
    return t;
}

/* Store ``tracker`` (an object or None) as a weak reference; NULL with an error set on failure. */
static int
fut_set_tracker(Fut *self, PyObject *tracker)
{
    if (tracker == NULL || tracker == Py_None) {
        Py_CLEAR(self->tracker);
        return 0;
    }
    PyObject *ref = PyWeakref_NewRef(tracker, NULL);
    if (ref == NULL) {
        return -1;
    }
    Py_XSETREF(self->tracker, ref);
    return 0;
}

static PyObject *fut_vectorcall(Fut *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);

static PyObject *
fut_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *self = PyType_GenericNew(type, args, kwds);
    if (self != NULL) {
        live++;
    }
    return self;
}

/* DeliveryFuture(tracker=None, value=None, topic=None, key=None, headers=None) */
static int
fut_init(Fut *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tracker", "value", "topic", "key", "headers", NULL};
    PyObject *tracker = Py_None, *value = Py_None, *topic = Py_None, *key = Py_None, *headers = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OOOOO:DeliveryFuture", kwlist, &tracker, &value, &topic, &key,
                                     &headers)) {
        return -1;
    }
    if (fut_set_tracker(self, tracker) < 0) {
        return -1;
    }
    set_slot(&self->topic, topic);
    set_slot(&self->value, value);
    set_slot(&self->key, key);
    set_slot(&self->headers, headers);
    set_slot(&self->outcome, UNSET);
    set_slot(&self->future, Py_None);
    if (Py_TYPE(self) == fut_type) {
        self->vectorcall = (vectorcallfunc)fut_vectorcall;
    }
    if (!PyObject_GC_IsTracked((PyObject *)self)) {
        PyObject_GC_Track(self);
    }
    return 0;
}

/* Whether ``o`` can never be part of a reference cycle: unset, or of a type the collector does not
 * handle (str, bytes, int...). Tracking state is not enough: an empty dict is untracked until it
 * holds a container. */
static int
atom(PyObject *o)
{
    return o == NULL || !PyObject_IS_GC(o);
}

/* Whether a future may leave the collector's lists: it refers to nothing that can be in a cycle
 * (its tracker only through a weak reference). */
static int
holds_only_atoms(Fut *self)
{
    return ((self->future == NULL || self->future == Py_None) && atom(self->topic) && atom(self->key) &&
            atom(self->value) && atom(self->headers) && atom(self->outcome == UNSET || self->outcome == DELIVERED ? NULL : self->outcome) &&
            atom(self->timestamp_type) && atom(self->partition));
}

/* A pending future of the exact type, not tracked unless what it holds may be in a cycle. */
static Fut *
make_future(PyObject *tracker_ref, PyObject *value, PyObject *topic, PyObject *key, PyObject *headers)
{
    Fut *self = PyObject_GC_New(Fut, fut_type); /* takes the reference to the heap type an instance holds */
    if (self == NULL) {
        return NULL;
    }
    live++;
    self->vectorcall = (vectorcallfunc)fut_vectorcall;
    Py_INCREF(Py_None);
    self->future = Py_None;
    Py_INCREF(headers);
    self->headers = headers;
    Py_INCREF(key);
    self->key = key;
    Py_INCREF(UNSET);
    self->outcome = UNSET;
    Py_INCREF(topic);
    self->topic = topic;
    Py_XINCREF(tracker_ref);
    self->tracker = tracker_ref;
    Py_INCREF(value);
    self->value = value;
    self->partition = self->timestamp_type = NULL;
    self->offset = self->timestamp = 0;
    self->has = 0;
    self->owner = NULL;
    self->prev = self->next = NULL;
    if (!holds_only_atoms(self)) {
        PyObject_GC_Track(self);
    }
    return self;
}

/* new_future(tracker, value, topic, key, headers): what produce() makes per message, in one call. */
static PyObject *
new_future(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (fut_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "kcons.kafka._speedups.make_type was not called");
        return NULL;
    }
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "new_future takes (tracker, value, topic, key, headers)");
        return NULL;
    }
    PyObject *ref = NULL;
    if (args[0] != Py_None && (ref = PyWeakref_NewRef(args[0], NULL)) == NULL) {
        return NULL;
    }
    Fut *self = make_future(ref, args[1], args[2], args[3], args[4]);
    Py_XDECREF(ref);
    return (PyObject *)self;
}

/* The failure path of the claim, as in the Python class: settle through _report, then re-raise. */
static PyObject *
claim_failed(Fut *self, PyObject *tracker, PyObject *pending, PyObject *err, PyObject *msg)
{
    PyObject *type, *val, *tb;
    PyErr_Fetch(&type, &val, &tb);
    int claimed = 1; /* without the set, report anyway: _report settles a future at most once */
    if (pending != NULL && (claimed = pending_discard(pending, (PyObject *)self)) < 0) {
        PyErr_Clear();
        claimed = 1;
    }
    if (claimed) {
        PyObject *r = PyObject_CallMethodObjArgs((PyObject *)self, s_report, tracker, err, msg, NULL);
        if (r == NULL) {
            PyErr_Clear(); /* the error that was pending when the report came is the one passed on */
        }
        Py_XDECREF(r);
    }
    /* Passed on normalized (an instance), as an except clause would: confluent-kafka sets its
     * fatal error as a KafkaError value of KafkaException, which it cannot raise again as it is. */
    PyErr_NormalizeException(&type, &val, &tb);
    PyErr_Restore(type, val, tb);
    return NULL;
}

/* The partition, offset and timestamp method descriptors of confluent-kafka's Message, found on
 * the first report of an immutable type whose three methods are method descriptors (a type that
 * cannot change and is never freed): called directly, without a lookup per report. Any other
 * report type is asked by name, as Python would. */
static PyTypeObject *report_type = NULL;
static PyObject *report_methods[3] = {NULL, NULL, NULL};

static PyObject *
report_call(PyObject *msg, int which)
{
    PyObject *names[3] = {s_partition, s_offset, s_timestamp};
    PyTypeObject *tp = Py_TYPE(msg);
    if (report_type == NULL && PyType_HasFeature(tp, Py_TPFLAGS_IMMUTABLETYPE) &&
        !PyType_HasFeature(tp, Py_TPFLAGS_HEAPTYPE)) {
        PyObject *found[3] = {NULL, NULL, NULL};
        int ok = 1;
        for (int i = 0; i < 3 && ok; i++) {
            found[i] = PyObject_GetAttr((PyObject *)tp, names[i]);
            ok = found[i] != NULL && Py_IS_TYPE(found[i], &PyMethodDescr_Type);
        }
        if (ok) {
            for (int i = 0; i < 3; i++) {
                report_methods[i] = found[i];
            }
            report_type = tp;
        } else {
            for (int i = 0; i < 3; i++) {
                Py_XDECREF(found[i]);
            }
            PyErr_Clear();
        }
    }
    if (tp == report_type) {
        return PyObject_Vectorcall(report_methods[which], &msg, 1, NULL);
    }
    return PyObject_CallMethodNoArgs(msg, names[which]);
}

/* A report's offset or timestamp as a C integer. PyLong_AsLong where long is 64 bits: in this
 * CPython PyLong_AsLongLong goes through a byte-array conversion for every value above 2**30,
 * and every timestamp (milliseconds since 1970) is one. */
static long long
as_long_long(PyObject *v)
{
#if LONG_MAX == LLONG_MAX
    return PyLong_AsLong(v);
#else
    return PyLong_AsLongLong(v);
#endif
}

/* Record a successful report's partition, offset and timestamp (not the report itself). */
static int
record_report(Fut *self, PyObject *msg)
{
    PyObject *partition = report_call(msg, 0);
    if (partition == NULL) {
        return -1;
    }
    PyObject *offset = report_call(msg, 1);
    if (offset == NULL) {
        Py_DECREF(partition);
        return -1;
    }
    long long off = 0;
    int has = HAS_OFFSET | HAS_TIMESTAMP;
    if (offset == Py_None) {
        has |= OFFSET_NONE;
    } else {
        off = as_long_long(offset);
    }
    Py_DECREF(offset);
    if (off == -1 && PyErr_Occurred()) {
        Py_DECREF(partition);
        return -1;
    }
    PyObject *ts = report_call(msg, 2);
    if (ts == NULL || !PyTuple_Check(ts) || PyTuple_GET_SIZE(ts) != 2) {
        if (ts != NULL) {
            PyErr_SetString(PyExc_TypeError, "Message.timestamp() must return a (type, timestamp) pair");
        }
        Py_XDECREF(ts);
        Py_DECREF(partition);
        return -1;
    }
    long long stamp = 0;
    PyObject *stamp_obj = PyTuple_GET_ITEM(ts, 1);
    if (stamp_obj == Py_None) {
        has |= TIMESTAMP_NONE;
    } else {
        stamp = as_long_long(stamp_obj);
        if (stamp == -1 && PyErr_Occurred()) {
            Py_DECREF(ts);
            Py_DECREF(partition);
            return -1;
        }
    }
    Py_XSETREF(self->partition, partition);
    set_slot(&self->timestamp_type, PyTuple_GET_ITEM(ts, 0));
    Py_DECREF(ts);
    self->offset = off;
    self->timestamp = stamp;
    self->has = has;
    return 0;
}

/* __call__(err, msg): confluent-kafka's delivery callback for this message. */
static PyObject *
fut_report(Fut *self, PyObject *err, PyObject *msg)
{
    if (self->tracker == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *tracker = PyWeakref_GetObject(self->tracker);
    if (tracker == NULL) {
        return NULL;
    }
    if (tracker == Py_None) {
        Py_CLEAR(self->tracker); /* the producer is gone: nobody waits for the pending set */
        Py_RETURN_NONE;
    }
    Py_INCREF(tracker);
    PyObject *result = NULL;
    int fast = PyObject_TypeCheck(tracker, tracker_type);
    if (PyErr_Occurred()) {
        /* confluent-kafka runs callbacks with a fatal error still pending after it raised it in the
         * same poll: no call works until it is fetched. Settle the future with the error put
         * aside, then pass the error on (as the Python class does). */
        PyObject *held = fast ? ((Tracker *)tracker)->pending : NULL;
        Py_XINCREF(held);
        result = claim_failed(self, tracker, held, err, msg);
        Py_XDECREF(held);
        Py_DECREF(tracker);
        return result;
    }
    PyObject *pending = fast ? ((Tracker *)tracker)->pending : PyObject_GetAttr(tracker, s_pending);
    if (fast) {
        Py_XINCREF(pending);
        if (pending == NULL) {
            PyErr_SetString(PyExc_AttributeError, "pending");
        }
    }
    if (pending == NULL) {
        result = claim_failed(self, tracker, NULL, err, msg);
        goto done;
    }
    /* The claim: exactly one of the report and fail_pending takes the future out of the set. */
    int claimed = pending_discard(pending, (PyObject *)self);
    if (claimed < 0) {
        result = claim_failed(self, tracker, pending, err, msg);
        goto done;
    }
    if (claimed == 0) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    if (err != Py_None) {
        result = PyObject_CallMethodObjArgs((PyObject *)self, s_report, tracker, err, msg, NULL);
        goto done;
    }
    if (record_report(self, msg) < 0) {
        /* An unreadable report: _report settles the future (failed) and the error is passed on. */
        result = claim_failed(self, tracker, NULL, err, msg);
        goto done;
    }
    Py_CLEAR(self->tracker); /* let the producer go once delivered */
    if (fast) {
        ((Tracker *)tracker)->delivered++;
    } else {
        PyObject *count = PyObject_GetAttr(tracker, s_delivered);
        PyObject *next = count == NULL ? NULL : PyNumber_Add(count, one);
        Py_XDECREF(count);
        int set = next == NULL ? -1 : PyObject_SetAttr(tracker, s_delivered, next);
        Py_XDECREF(next);
        if (set < 0) {
            goto done;
        }
    }
    set_slot(&self->outcome, DELIVERED);
    /* A waiter links after writing _future and reads _outcome after: one of the two sees the other. */
    if (self->future != NULL && self->future != Py_None) {
        result = PyObject_CallMethodNoArgs((PyObject *)self, s_publish);
        goto done;
    }
    if (Py_TYPE(self) == fut_type && PyObject_GC_IsTracked((PyObject *)self) && holds_only_atoms(self)) {
        PyObject_GC_UnTrack(self);
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    Py_XDECREF(pending);
    Py_DECREF(tracker);
    return result;
}

static PyObject *
fut_vectorcall(Fut *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "a DeliveryFuture is called with (err, msg)");
        return NULL;
    }
    return fut_report(self, args[0], args[1]);
}

static PyObject *
fut_call(Fut *self, PyObject *args, PyObject *kwds)
{
    PyObject *err, *msg;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "a DeliveryFuture is called with (err, msg)");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "DeliveryFuture", 2, 2, &err, &msg)) {
        return NULL;
    }
    return fut_report(self, err, msg);
}

/* Slot access with the semantics of __slots__: an unset slot raises AttributeError; setting one from
 * Python tracks the future again (the new value may be a container). */
static void
track(Fut *self)
{
    if (!PyObject_GC_IsTracked((PyObject *)self)) {
        PyObject_GC_Track(self);
    }
}

static PyObject *
unset_slot(void)
{
    PyErr_SetString(PyExc_AttributeError, "slot is not set");
    return NULL;
}

static PyObject *
slot_get(Fut *self, void *closure)
{
    PyObject *value = *(PyObject **)((char *)self + (Py_ssize_t)closure);
    if (value == NULL) {
        return unset_slot();
    }
    Py_INCREF(value);
    return value;
}

static int
slot_set(Fut *self, PyObject *value, void *closure)
{
    PyObject **slot = (PyObject **)((char *)self + (Py_ssize_t)closure);
    if (value == NULL && *slot == NULL) {
        PyErr_SetString(PyExc_AttributeError, "slot is not set");
        return -1;
    }
    set_slot(slot, value);
    track(self);
    return 0;
}

static PyObject *
tracker_get(Fut *self, void *closure)
{
    return fut_tracker(self);
}

static int
tracker_set(Fut *self, PyObject *value, void *closure)
{
    return fut_set_tracker(self, value);
}

/* _offset and _timestamp: ints (or None) kept as C integers, so a delivered future allocates none. */
static PyObject *
number_get(Fut *self, void *closure)
{
    int which = (int)(Py_ssize_t)closure;
    int has = which == HAS_OFFSET ? HAS_OFFSET : HAS_TIMESTAMP;
    int none = which == HAS_OFFSET ? OFFSET_NONE : TIMESTAMP_NONE;
    if (!(self->has & has)) {
        return unset_slot();
    }
    if (self->has & none) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong(which == HAS_OFFSET ? self->offset : self->timestamp);
}

static int
number_set(Fut *self, PyObject *value, void *closure)
{
    int which = (int)(Py_ssize_t)closure;
    int has = which == HAS_OFFSET ? HAS_OFFSET : HAS_TIMESTAMP;
    int none = which == HAS_OFFSET ? OFFSET_NONE : TIMESTAMP_NONE;
    if (value == NULL) {
        if (!(self->has & has)) {
            PyErr_SetString(PyExc_AttributeError, "slot is not set");
            return -1;
        }
        self->has &= ~(has | none);
        return 0;
    }
    long long n = 0;
    if (value != Py_None) {
        if (!PyLong_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "an offset or timestamp is an int or None");
            return -1;
        }
        n = PyLong_AsLongLong(value);
        if (n == -1 && PyErr_Occurred()) {
            return -1;
        }
    }
    if (which == HAS_OFFSET) {
        self->offset = n;
    } else {
        self->timestamp = n;
    }
    self->has = (self->has & ~none) | has | (value == Py_None ? none : 0);
    return 0;
}

#define SLOT(name, field) {name, (getter)slot_get, (setter)slot_set, NULL, (void *)offsetof(Fut, field)}
static PyGetSetDef fut_getset[] = {
    SLOT("_future", future),
    SLOT("_headers", headers),
    SLOT("_key", key),
    SLOT("_outcome", outcome),
    SLOT("_partition", partition),
    SLOT("_timestamp_type", timestamp_type),
    SLOT("_topic", topic),
    SLOT("_value", value),
    {"_tracker", (getter)tracker_get, (setter)tracker_set, NULL, NULL},
    {"_offset", (getter)number_get, (setter)number_set, NULL, (void *)(Py_ssize_t)HAS_OFFSET},
    {"_timestamp", (getter)number_get, (setter)number_set, NULL, (void *)(Py_ssize_t)HAS_TIMESTAMP},
    {NULL},
};
#undef SLOT

static PyMemberDef fut_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Fut, vectorcall), READONLY},
    {NULL},
};

static PyType_Slot fut_slots[] = {
    {Py_tp_dealloc, fut_dealloc},
    {Py_tp_traverse, fut_traverse},
    {Py_tp_clear, fut_clear},
    {Py_tp_init, fut_init},
    {Py_tp_new, fut_new},
    {Py_tp_call, fut_call},
    {Py_tp_getset, fut_getset},
    {Py_tp_members, fut_members},
    {0, NULL},
};

static PyType_Spec fut_spec = {
    .name = "kcons.kafka.futures.DeliveryFuture",
    .basicsize = sizeof(Fut),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = fut_slots,
};

/* make_type(unset, delivered): build the DeliveryFuture type (once) with the Python class's outcome sentinels. */
static PyObject *
make_type(PyObject *module, PyObject *args)
{
    PyObject *unset, *delivered;
    if (!PyArg_ParseTuple(args, "OO:make_type", &unset, &delivered)) {
        return NULL;
    }
    /* A reload of kcons.kafka.futures calls this again with new sentinels: the one type is kept
     * (existing futures stay valid) and takes the new sentinels and methods. */
    if (fut_type == NULL) {
        PyObject *type = PyType_FromModuleAndSpec(module, &fut_spec, NULL);
        if (type == NULL) {
            return NULL;
        }
        fut_type = (PyTypeObject *)type;
    }
    Py_INCREF(unset);
    Py_XSETREF(UNSET, unset);
    Py_INCREF(delivered);
    Py_XSETREF(DELIVERED, delivered);
    Py_INCREF(fut_type);
    return (PyObject *)fut_type;
}

/* ---- FastProduce ------------------------------------------------------------------------- */

/* FastProduce(produce, failed, client, tracker, event_id, header_name): a producer's produce(). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow;        /* the Python produce method, bound: every case this does not handle */
    PyObject *failed;      /* the producer's _produce_failed(exc, fut, pending, topic, value, key, headers, partition, block) */
    PyObject *client;      /* .closed and .raw */
    PyObject *client_dict; /* the client's __dict__, where those two are read without an attribute lookup */
    PyObject *tracker;     /* the DeliveryTracker (a TrackerBase) */
    PyObject *tracker_ref; /* a weak reference to it, shared by the futures */
    PyObject *event_id;    /* the kcons-id source, or None when the producer adds no ids */
    PyObject *header_name;
    PyCFunction id_function; /* event_id's C function when it is a builtin without arguments (kcons._idgen's) */
    PyObject *id_self;
} FastProduce;

static int
fp_traverse(FastProduce *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->slow);
    Py_VISIT(self->failed);
    Py_VISIT(self->client);
    Py_VISIT(self->client_dict);
    Py_VISIT(self->tracker);
    Py_VISIT(self->tracker_ref);
    Py_VISIT(self->event_id);
    Py_VISIT(self->header_name);
    return 0;
}

static int
fp_clear(FastProduce *self)
{
    Py_CLEAR(self->slow);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->client);
    Py_CLEAR(self->client_dict);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->tracker_ref);
    Py_CLEAR(self->event_id);
    Py_CLEAR(self->header_name);
    self->id_function = NULL; /* its self belonged to event_id */
    self->id_self = NULL;
    return 0;
}

static void
fp_dealloc(FastProduce *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    fp_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Register ``fut`` in the tracker's pending set as produce() does; 1 when registered, 0 when a
 * concurrent fail_pending already failed it (it must not be produced), -1 on error. */
static int
register_pending(Tracker *tracker, Fut *fut, PyObject **pending_out)
{
    for (;;) {
        PyObject *pending = tracker->pending;
        if (pending == NULL) {
            PyErr_SetString(PyExc_AttributeError, "pending");
            return -1;
        }
        Py_INCREF(pending);
        if (pending_add(pending, (PyObject *)fut) < 0) {
            Py_DECREF(pending);
            return -1;
        }
        if (tracker->pending == pending) {
            *pending_out = pending;
            return 1;
        }
        /* Another thread's fail_pending swapped the set out meanwhile: take the future back and
         * register it again, unless that call already took (and failed) it. */
        int removed = pending_discard(pending, (PyObject *)fut);
        Py_DECREF(pending);
        if (removed < 0) {
            return -1;
        }
        if (removed == 0) {
            return 0;
        }
    }
}

/* The client's attribute ``name`` (a new reference): from its __dict__ when it is there. */
static PyObject *
client_attr(FastProduce *self, PyObject *name)
{
    if (self->client_dict != NULL) {
        PyObject *v = PyDict_GetItemWithError(self->client_dict, name);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    return PyObject_GetAttr(self->client, name);
}

/* confluent-kafka's Producer.produce, found on the first raw producer of a static immutable type:
 * called without a method lookup per message. A subclass is asked by name. */
static PyTypeObject *raw_type = NULL;
static PyObject *raw_produce = NULL;

static PyObject *
call_produce(PyObject *const *pargs, size_t n)
{
    PyTypeObject *tp = Py_TYPE(pargs[0]);
    if (raw_type == NULL && PyType_HasFeature(tp, Py_TPFLAGS_IMMUTABLETYPE) && !PyType_HasFeature(tp, Py_TPFLAGS_HEAPTYPE)) {
        PyObject *found = PyObject_GetAttr((PyObject *)tp, s_produce);
        if (found != NULL && Py_IS_TYPE(found, &PyMethodDescr_Type)) {
            raw_produce = found;
            raw_type = tp;
        } else {
            Py_XDECREF(found);
            PyErr_Clear();
        }
    }
    if (tp == raw_type) {
        return PyObject_Vectorcall(raw_produce, pargs, n, NULL);
    }
    return PyObject_VectorcallMethod(s_produce, (PyObject *const *)pargs, n, NULL);
}

static PyObject *
fp_vectorcall(FastProduce *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *key = nargs > 2 ? args[2] : Py_None;
    PyObject *partition = minus_one;
    if (nargs < 2 || nargs > 3 || fut_type == NULL) {
        goto slow;
    }
    if (kwnames != NULL) {
        /* Keywords this path takes: key (when not positional), partition, and the defaults of the others. */
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
            if (name == s_partition_kw && v != Py_None) {
                if (!PyLong_CheckExact(v)) {
                    goto slow;
                }
                partition = v;
            } else if (name == s_key_kw && nargs == 2) {
                key = v;
            } else if (!((name == s_headers_kw || name == s_on_delivery_kw || name == s_partition_kw) && v == Py_None) &&
                       !(name == s_block_kw && v == Py_True)) {
                goto slow;
            }
        }
    }
    PyObject *closed = client_attr(self, s_closed);
    if (closed == NULL) {
        return NULL;
    }
    Py_DECREF(closed);
    if (closed != Py_False) {
        goto slow; /* raises the closed producer's error */
    }
    PyObject *topic = args[0], *value = args[1];
    PyObject *eid = Py_None, *headers = Py_None;
    if (self->event_id != Py_None) {
        eid = self->id_function != NULL ? self->id_function(self->id_self, NULL) : PyObject_CallNoArgs(self->event_id);
        if (eid == NULL) {
            return NULL;
        }
        headers = PyDict_New();
        if (headers == NULL || PyDict_SetItem(headers, self->header_name, eid) < 0) {
            Py_XDECREF(headers);
            Py_DECREF(eid);
            return NULL;
        }
    } else {
        Py_INCREF(eid);
        Py_INCREF(headers);
    }
    Fut *fut = make_future(self->tracker_ref, value, topic, key, eid);
    Py_DECREF(eid);
    if (fut == NULL) {
        Py_DECREF(headers);
        return NULL;
    }
    PyObject *pending = NULL;
    int registered = register_pending((Tracker *)self->tracker, fut, &pending);
    if (registered <= 0) {
        Py_DECREF(headers);
        if (registered < 0) {
            Py_DECREF(fut);
            return NULL;
        }
        return (PyObject *)fut; /* failed by the abort or close that came first: not produced */
    }
    PyObject *raw = client_attr(self, s_raw);
    PyObject *r = NULL;
    if (raw != NULL) {
        /* All positional (partition, callback, on_delivery, timestamp, headers), as in produce(). */
        PyObject *pargs[9] = {raw, topic, value, key, partition, (PyObject *)fut, Py_None, zero, headers};
        r = call_produce(pargs, 9);
        Py_DECREF(raw);
    }
    if (r != NULL) {
        Py_DECREF(r);
        Py_DECREF(headers);
        Py_DECREF(pending);
        return (PyObject *)fut;
    }
    /* BufferError, KafkaException or a bad argument: the Python producer decides (waits for room,
     * raises a typed error), exactly as its own produce() does. */
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL && exc != NULL) {
        PyException_SetTraceback(exc, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyObject *py_partition = partition == minus_one ? Py_None : partition;
    PyObject *fargs[10] = {NULL, exc, (PyObject *)fut, pending, topic, value, key, headers, py_partition, Py_True};
    /* Called as the handler of ``exc`` (sys.exc_info()), so what it raises has it as __context__. */
    PyObject *old_type, *old_value, *old_tb;
    PyErr_GetExcInfo(&old_type, &old_value, &old_tb);
    Py_XINCREF(exc);
    PyErr_SetExcInfo(exc == NULL ? NULL : (Py_INCREF(Py_TYPE(exc)), (PyObject *)Py_TYPE(exc)), exc, NULL);
    PyObject *out = PyObject_Vectorcall(self->failed, fargs + 1, 9 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    PyErr_SetExcInfo(old_type, old_value, old_tb);
    Py_XDECREF(exc);
    Py_DECREF(headers);
    Py_DECREF(pending);
    Py_DECREF(fut);
    return out;
slow:
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static PyObject *
fp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *slow, *failed, *client, *tracker, *event_id, *header_name;
    if (!PyArg_ParseTuple(args, "OOOOOU:FastProduce", &slow, &failed, &client, &tracker, &event_id, &header_name)) {
        return NULL;
    }
    if (tracker_type == NULL || !PyObject_TypeCheck(tracker, tracker_type)) {
        PyErr_SetString(PyExc_TypeError, "FastProduce needs a TrackerBase tracker");
        return NULL;
    }
    PyObject *ref = PyWeakref_NewRef(tracker, NULL);
    if (ref == NULL) {
        return NULL;
    }
    FastProduce *self = (FastProduce *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(ref);
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)fp_vectorcall;
    Py_INCREF(slow);
    self->slow = slow;
    Py_INCREF(failed);
    self->failed = failed;
    Py_INCREF(client);
    self->client = client;
    self->client_dict = PyObject_GenericGetDict(client, NULL); /* NULL (no __dict__): attribute lookups */
    if (self->client_dict == NULL) {
        PyErr_Clear();
    }
    Py_INCREF(tracker);
    self->tracker = tracker;
    self->tracker_ref = ref;
    Py_INCREF(event_id);
    self->event_id = event_id;
    /* A builtin taking no arguments is called as the interpreter would, without the call protocol. */
    if (PyCFunction_Check(event_id) && PyCFunction_GET_FLAGS(event_id) == METH_NOARGS) {
        self->id_function = PyCFunction_GET_FUNCTION(event_id);
        self->id_self = PyCFunction_GET_SELF(event_id); /* borrowed: event_id holds it */
    }
    Py_INCREF(header_name);
    self->header_name = header_name;
    return (PyObject *)self;
}

static PyMemberDef fp_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(FastProduce, vectorcall), READONLY},
    {"__wrapped__", T_OBJECT, offsetof(FastProduce, slow), READONLY, "The Python produce() this one stands for."},
    {NULL},
};

static PyObject *
fp_getattr_doc(FastProduce *self, void *closure)
{
    return PyObject_GetAttrString(self->slow, "__doc__");
}

static PyGetSetDef fp_getset[] = {
    {"__doc__", (getter)fp_getattr_doc, NULL, NULL, NULL},
    {NULL},
};

static PyType_Slot fp_slots[] = {
    {Py_tp_dealloc, fp_dealloc},
    {Py_tp_traverse, fp_traverse},
    {Py_tp_clear, fp_clear},
    {Py_tp_new, fp_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, fp_members},
    {Py_tp_getset, fp_getset},
    {0, NULL},
};

static PyType_Spec fp_spec = {
    .name = "kcons.kafka._speedups.FastProduce",
    .basicsize = sizeof(FastProduce),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = fp_slots,
};


/* ---- FastMethod -------------------------------------------------------------------------- */

/* FastMethod(function): the class attribute ``produce``. On an instance whose ``__dict__`` holds a
 * FastProduce under ``_fast_produce`` it gives that object; otherwise (and on the class) it behaves
 * as the plain function it wraps. A subclass that defines produce, or a test that patches it on
 * the class, is found first and wins, as with any method. */
typedef struct {
    PyObject_HEAD
    PyObject *function;
    vectorcallfunc vectorcall;
} FastMethod;

/* The FastProduce type, so that FastMethod calls one without a second dispatch. */
static PyTypeObject *fp_type = NULL;

static PyObject *s_fast_produce;

static int
fm_traverse(FastMethod *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->function);
    return 0;
}

static int
fm_clear(FastMethod *self)
{
    Py_CLEAR(self->function);
    return 0;
}

static void
fm_dealloc(FastMethod *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    fm_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* The FastProduce ``obj`` keeps in its ``__dict__`` under ``_fast_produce`` (a new reference), or
 * NULL: with no error when it has none (or no ``__dict__``), with one set on a failure. The one
 * lookup of both ways in (__get__ and the call), so that they never disagree. */
static PyObject *
instance_fast(PyObject *obj)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear(); /* no __dict__: the plain function decides */
        }
        return NULL;
    }
    PyObject *fast = PyDict_GetItemWithError(dict, s_fast_produce);
    Py_XINCREF(fast);
    Py_DECREF(dict);
    return fast;
}

static PyObject *
fm_descr_get(FastMethod *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self->function);
        return self->function;
    }
    PyObject *fast = instance_fast(obj);
    if (fast != NULL || PyErr_Occurred()) {
        return fast;
    }
    return PyMethod_New(self->function, obj);
}

/* FastMethod(obj, *args): the call the interpreter makes for ``obj.produce(*args)``. The type is a
 * method descriptor (Py_TPFLAGS_METHOD_DESCRIPTOR), so the interpreter neither calls __get__ nor
 * builds a bound object per call: it passes the instance as the first argument, and this finds
 * its FastProduce. Equivalent to ``fm_descr_get(self, obj)(*args)``, as that flag requires. */
static PyObject *
fm_vectorcall(FastMethod *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs >= 1) {
        PyObject *fast = instance_fast(args[0]);
        if (fast != NULL) {
            PyObject *out;
            if (Py_IS_TYPE(fast, fp_type)) {
                out = fp_vectorcall((FastProduce *)fast, args + 1, (size_t)(nargs - 1), kwnames);
            } else {
                out = PyObject_Vectorcall(fast, args + 1, (size_t)(nargs - 1), kwnames);
            }
            Py_DECREF(fast);
            return out;
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    return PyObject_Vectorcall(self->function, args, nargsf, kwnames);
}

static PyObject *
fm_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *function;
    if (!PyArg_ParseTuple(args, "O:FastMethod", &function)) {
        return NULL;
    }
    FastMethod *self = (FastMethod *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(function);
    self->function = function;
    self->vectorcall = (vectorcallfunc)fm_vectorcall;
    return (PyObject *)self;
}

static PyObject *
fm_get_func(FastMethod *self, void *closure)
{
    Py_INCREF(self->function);
    return self->function;
}

static PyObject *
fm_get_doc(FastMethod *self, void *closure)
{
    return PyObject_GetAttrString(self->function, "__doc__");
}

static PyGetSetDef fm_getset[] = {
    {"__func__", (getter)fm_get_func, NULL, "The Python function.", NULL},
    {"__wrapped__", (getter)fm_get_func, NULL, "The Python function.", NULL},
    {"__doc__", (getter)fm_get_doc, NULL, NULL, NULL},
    {NULL},
};

static PyMemberDef fm_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(FastMethod, vectorcall), READONLY},
    {NULL},
};

static PyType_Slot fm_slots[] = {
    {Py_tp_dealloc, fm_dealloc},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, fm_members},
    {Py_tp_traverse, fm_traverse},
    {Py_tp_clear, fm_clear},
    {Py_tp_new, fm_new},
    {Py_tp_descr_get, fm_descr_get},
    {Py_tp_getset, fm_getset},
    {0, NULL},
};

static PyType_Spec fm_spec = {
    .name = "kcons.kafka._speedups.FastMethod",
    .basicsize = sizeof(FastMethod),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .slots = fm_slots,
};


/* ---- module ------------------------------------------------------------------------------ */

static PyObject *
is_tracked(PyObject *module, PyObject *obj)
{
    return PyBool_FromLong(PyObject_GC_IsTracked(obj));
}

static PyObject *
live_futures(PyObject *module, PyObject *unused)
{
    return PyLong_FromSsize_t(live);
}

static PyMethodDef module_methods[] = {
    {"live_futures", (PyCFunction)live_futures, METH_NOARGS,
     "How many C DeliveryFutures are alive (the garbage collector does not list untracked ones)."},
    {"make_type", (PyCFunction)make_type, METH_VARARGS, "Build the DeliveryFuture type with the given outcome sentinels."},
    {"new_future", (PyCFunction)(void (*)(void))new_future, METH_FASTCALL,
     "new_future(tracker, value, topic, key, headers): a pending DeliveryFuture."},
    {"is_tracked", (PyCFunction)is_tracked, METH_O, "Whether the garbage collector tracks the object (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kcons.kafka._speedups",
    .m_doc = "The per-message path of produce() in C (see kcons.kafka.futures).",
    .m_size = -1,
    .m_methods = module_methods,
};

static int
intern(PyObject **where, const char *name)
{
    *where = PyUnicode_InternFromString(name);
    return *where == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    if (intern(&s_pending, "pending") < 0 || intern(&s_delivered, "delivered") < 0 ||
        intern(&s_partition, "partition") < 0 || intern(&s_offset, "offset") < 0 ||
        intern(&s_timestamp, "timestamp") < 0 || intern(&s_report, "_report") < 0 ||
        intern(&s_publish, "_publish_delivered") < 0 || intern(&s_closed, "closed") < 0 ||
        intern(&s_raw, "raw") < 0 || intern(&s_produce, "produce") < 0 || intern(&s_partition_kw, "partition") < 0 ||
        intern(&s_headers_kw, "headers") < 0 || intern(&s_on_delivery_kw, "on_delivery") < 0 ||
        intern(&s_block_kw, "block") < 0 || intern(&s_key_kw, "key") < 0 ||
        intern(&s_fast_produce, "_fast_produce") < 0 || intern(&s_add, "add") < 0 || intern(&s_remove, "remove") < 0 ||
        (minus_one = PyLong_FromLong(-1)) == NULL || (zero = PyLong_FromLong(0)) == NULL || (one = PyLong_FromLong(1)) == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    /* What kcons.kafka.futures expects (SPEEDUPS_API there): a stale build of an older source is not used. */
    if (PyModule_AddIntConstant(m, "API", 4) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *tt = PyType_FromModuleAndSpec(m, &tracker_spec, NULL);
    if (tt == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(tt);
    tracker_type = (PyTypeObject *)tt;
    if (PyModule_AddObject(m, "TrackerBase", tt) < 0) {
        Py_DECREF(tt);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *fp = PyType_FromModuleAndSpec(m, &fp_spec, NULL);
    if (fp == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_XSETREF(fp_type, (PyTypeObject *)Py_NewRef(fp));
    if (PyModule_AddObject(m, "FastProduce", fp) < 0) {
        Py_DECREF(fp);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *pst = PyType_FromModuleAndSpec(m, &ps_spec, NULL);
    if (pst == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(pst);
    pending_type = (PyTypeObject *)pst;
    if (PyModule_AddObject(m, "PendingSet", pst) < 0) {
        Py_DECREF(pst);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *fmt = PyType_FromModuleAndSpec(m, &fm_spec, NULL);
    if (fmt == NULL || PyModule_AddObject(m, "FastMethod", fmt) < 0) {
        Py_XDECREF(fmt);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
