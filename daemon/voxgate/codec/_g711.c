/* G.711 by table lookup: the per-call media tick's encode and decode.
 *
 * The conversions themselves are the stdlib audioop's (voxgate/codec/g711.py
 * builds the tables with it at import), so this module holds no G.711 law of
 * its own, only the lookups: audioop's lin2ulaw searches the segment of every
 * sample (about 34 instructions per sample, measured with callgrind), a table
 * indexed by the sample's top bits is one load.
 *
 *   Encoder(table, shift).encode(pcm, width) -> bytes
 *       pcm: PCM16 in the machine's byte order, width must be 2; one code
 *       byte per sample: table[(sample >> shift) + (32768 >> shift)].
 *       table holds 65536 >> shift code bytes.
 *   Decoder(table).decode(payload, width) -> bytes
 *       payload: code bytes; width must be 2; two bytes per code byte:
 *       the table's code-th native int16. table holds 256 of them (512 bytes).
 *
 * Both take any object with the buffer protocol and raise ValueError for a
 * width other than 2 or a PCM buffer of an odd length, like audioop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CODES 256

typedef struct {
    PyObject_HEAD
    unsigned char *table;
    int shift;
} Encoder;

typedef struct {
    PyObject_HEAD
    int16_t table[CODES];
} Decoder;

static int
check_width(PyObject *width)
{
    long w = PyLong_AsLong(width);
    if (w == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (w != 2) {
        PyErr_SetString(PyExc_ValueError, "only 2-byte (PCM16) samples are supported");
        return -1;
    }
    return 0;
}

static int
Encoder_init(Encoder *self, PyObject *args, PyObject *kwds)
{
    Py_buffer table;
    int shift;
    static char *kwlist[] = {"table", "shift", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*i", kwlist, &table, &shift)) {
        return -1;
    }
    if (shift < 0 || shift > 15 || table.len != (Py_ssize_t)(65536 >> shift)) {
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "an encoder table holds 65536 >> shift code bytes");
        return -1;
    }
    unsigned char *copy = PyMem_Malloc((size_t)table.len);
    if (copy == NULL) {
        PyBuffer_Release(&table);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(copy, table.buf, (size_t)table.len);
    PyBuffer_Release(&table);
    PyMem_Free(self->table);
    self->table = copy;
    self->shift = shift;
    return 0;
}

static void
Encoder_dealloc(Encoder *self)
{
    PyMem_Free(self->table);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Encoder_encode(Encoder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode(pcm, width) takes 2 arguments");
        return NULL;
    }
    if (self->table == NULL) {
        PyErr_SetString(PyExc_ValueError, "encoder not initialised");
        return NULL;
    }
    if (check_width(args[1]) < 0) {
        return NULL;
    }
    Py_buffer pcm;
    if (PyObject_GetBuffer(args[0], &pcm, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (pcm.len % 2) {
        PyBuffer_Release(&pcm);
        PyErr_SetString(PyExc_ValueError, "not a whole number of frames");
        return NULL;
    }
    Py_ssize_t samples = pcm.len / 2;
    PyObject *out = PyBytes_FromStringAndSize(NULL, samples);
    if (out != NULL) {
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        const unsigned char *src = pcm.buf;
        const unsigned char *table = self->table;
        const int shift = self->shift;
        const int offset = 32768 >> shift;
        for (Py_ssize_t i = 0; i < samples; i++) {
            int16_t sample;
            memcpy(&sample, src + 2 * i, 2);
            dst[i] = table[(sample >> shift) + offset];
        }
    }
    PyBuffer_Release(&pcm);
    return out;
}

static int
Decoder_init(Decoder *self, PyObject *args, PyObject *kwds)
{
    Py_buffer table;
    static char *kwlist[] = {"table", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*", kwlist, &table)) {
        return -1;
    }
    if (table.len != (Py_ssize_t)sizeof(self->table)) {
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "a decoder table holds 256 native int16 samples");
        return -1;
    }
    memcpy(self->table, table.buf, sizeof(self->table));
    PyBuffer_Release(&table);
    return 0;
}

static PyObject *
Decoder_decode(Decoder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "decode(payload, width) takes 2 arguments");
        return NULL;
    }
    if (check_width(args[1]) < 0) {
        return NULL;
    }
    Py_buffer payload;
    if (PyObject_GetBuffer(args[0], &payload, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *out = NULL;
    if (payload.len > PY_SSIZE_T_MAX / 2) {
        PyErr_NoMemory();
    } else {
        out = PyBytes_FromStringAndSize(NULL, payload.len * 2);
    }
    if (out != NULL) {
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        const unsigned char *src = payload.buf;
        for (Py_ssize_t i = 0; i < payload.len; i++) {
            memcpy(dst + 2 * i, &self->table[src[i]], 2);
        }
    }
    PyBuffer_Release(&payload);
    return out;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_FASTCALL,
     "encode(pcm, width) -> bytes: one code byte per PCM16 sample"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)(void (*)(void))Decoder_decode, METH_FASTCALL,
     "decode(payload, width) -> bytes: one PCM16 sample per code byte"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "voxgate.codec._g711.Encoder",
    .tp_doc = "Encoder(table, shift): PCM16 to G.711 code bytes by table lookup",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "voxgate.codec._g711.Decoder",
    .tp_doc = "Decoder(table): G.711 code bytes to PCM16 by table lookup",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_methods = Decoder_methods,
};

static struct PyModuleDef g711_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "voxgate.codec._g711",
    .m_doc = "G.711 encode and decode by table lookup (tables built by voxgate.codec.g711).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__g711(void)
{
    if (PyType_Ready(&EncoderType) < 0 || PyType_Ready(&DecoderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&g711_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Encoder", (PyObject *)&EncoderType) < 0
        || PyModule_AddObjectRef(module, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
