/* One RTP leg's non-blocking UDP reads and writes, without the socket module's
 * per-datagram work (voxgate/transports/datagram.py says when it is used).
 *
 * Measured with callgrind on the media tick (bench/tick_cost.py): around each
 * recvfrom/sendto of 172 bytes, Python's socket module formats the source
 * address with sprintf, builds and frees the address tuple, allocates a
 * 2 KiB bytes object and shrinks it, parses the destination tuple and its
 * host string (inet_pton) and drops and retakes the GIL: together more
 * instructions than the RTP packet's own parsing and jitter buffering. Here:
 *
 *   DatagramIo(fd, family, max_datagram_bytes)
 *       fd: a non-blocking SOCK_DGRAM socket of family AF_INET or AF_INET6,
 *       owned (and closed) by the caller.
 *   recv() -> (bytes, (host, port)) | None
 *       One recvfrom(2) of at most max_datagram_bytes (a longer datagram is
 *       truncated, as socket.recvfrom does). The address is the same tuple
 *       object as the previous datagram's while the source stays the same.
 *       None when no datagram is waiting or the read failed (an ICMP error
 *       reported on the socket): the caller tries again at its next tick.
 *   send(datagram, addr) -> None
 *       One sendto(2) to addr, a (host, port) tuple with an IP literal of the
 *       socket's family; parsed again only when the host or port changes (by
 *       value: mypyc-compiled callers box a new tuple for every call).
 *       Raises OSError as socket.sendto does (also for a host that is not
 *       such a literal) and OverflowError for a port outside 0-65535.
 *
 * Both run with the GIL held: the socket is non-blocking, so neither waits.
 * EINTR runs the signal handlers (PEP 475) and retries.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef struct {
    PyObject_HEAD
    int fd;
    int family;
    Py_ssize_t max_bytes;
    char *buffer;
    struct sockaddr_storage rx_addr;
    socklen_t rx_len;
    PyObject *rx_tuple; /* (host, port) of rx_addr, or NULL */
    struct sockaddr_storage tx_addr;
    socklen_t tx_len;
    PyObject *tx_host; /* the host str tx_addr was parsed from, or NULL */
    long tx_port;      /* and its port */
} DatagramIo;

static int
DatagramIo_init(DatagramIo *self, PyObject *args, PyObject *kwds)
{
    int fd, family;
    Py_ssize_t max_bytes;
    static char *kwlist[] = {"fd", "family", "max_datagram_bytes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iin", kwlist, &fd, &family, &max_bytes)) {
        return -1;
    }
    if (family != AF_INET && family != AF_INET6) {
        PyErr_SetString(PyExc_ValueError, "family must be AF_INET or AF_INET6");
        return -1;
    }
    if (fd < 0 || max_bytes < 1 || max_bytes > 65536) {
        PyErr_SetString(PyExc_ValueError, "fd must be >= 0 and max_datagram_bytes 1-65536");
        return -1;
    }
    char *buffer = PyMem_Malloc((size_t)max_bytes);
    if (buffer == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(self->buffer);
    self->buffer = buffer;
    self->fd = fd;
    self->family = family;
    self->max_bytes = max_bytes;
    self->rx_len = 0;
    Py_CLEAR(self->rx_tuple);
    Py_CLEAR(self->tx_host);
    return 0;
}

static void
DatagramIo_dealloc(DatagramIo *self)
{
    Py_CLEAR(self->rx_tuple);
    Py_CLEAR(self->tx_host);
    PyMem_Free(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* (host, port) of a received address; NULL with an exception set. */
static PyObject *
address_tuple(const struct sockaddr_storage *addr)
{
    char host[INET6_ADDRSTRLEN];
    const void *ip;
    unsigned short port;
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)addr;
        ip = &in4->sin_addr;
        port = ntohs(in4->sin_port);
    } else if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        ip = &in6->sin6_addr;
        port = ntohs(in6->sin6_port);
    } else {
        PyErr_SetString(PyExc_OSError, "datagram from an address that is not IP");
        return NULL;
    }
    if (inet_ntop(addr->ss_family, ip, host, sizeof(host)) == NULL) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(si)", host, (int)port);
}

static PyObject *
DatagramIo_recv(DatagramIo *self, PyObject *Py_UNUSED(ignored))
{
    if (self->buffer == NULL) {
        PyErr_SetString(PyExc_ValueError, "DatagramIo not initialised");
        return NULL;
    }
    struct sockaddr_storage source;
    socklen_t source_len;
    ssize_t n;
    for (;;) {
        source_len = sizeof(source);
        n = recvfrom(self->fd, self->buffer, (size_t)self->max_bytes, 0,
                     (struct sockaddr *)&source, &source_len);
        if (n >= 0 || errno != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
    if (n < 0) {
        Py_RETURN_NONE;
    }
    if (self->rx_tuple == NULL || source_len != self->rx_len
        || memcmp(&source, &self->rx_addr, source_len) != 0) {
        PyObject *address = address_tuple(&source);
        if (address == NULL) {
            return NULL;
        }
        Py_XSETREF(self->rx_tuple, address);
        memcpy(&self->rx_addr, &source, source_len);
        self->rx_len = source_len;
    }
    PyObject *data = PyBytes_FromStringAndSize(self->buffer, n);
    if (data == NULL) {
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, data, self->rx_tuple);
    Py_DECREF(data);
    return result;
}

/* Parse addr into self->tx_addr; 0, or -1 with an exception set. */
static int
parse_destination(DatagramIo *self, PyObject *addr)
{
    const char *host;
    int port;
    if (!PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) != 2) {
        PyErr_SetString(PyExc_TypeError, "addr must be a (host, port) tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(addr, "si", &host, &port)) {
        return -1;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535.");
        return -1;
    }
    struct sockaddr_storage parsed;
    memset(&parsed, 0, sizeof(parsed));
    socklen_t parsed_len;
    int ok;
    if (self->family == AF_INET) {
        struct sockaddr_in *in4 = (struct sockaddr_in *)&parsed;
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)port);
        ok = inet_pton(AF_INET, host, &in4->sin_addr);
        parsed_len = sizeof(*in4);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&parsed;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)port);
        ok = inet_pton(AF_INET6, host, &in6->sin6_addr);
        parsed_len = sizeof(*in6);
    }
    if (ok != 1) {
        PyErr_Format(PyExc_OSError, "%s is not an IP address of the socket's family", host);
        return -1;
    }
    memcpy(&self->tx_addr, &parsed, sizeof(parsed));
    self->tx_len = parsed_len;
    PyObject *host_str = PyTuple_GET_ITEM(addr, 0);
    Py_INCREF(host_str);
    Py_XSETREF(self->tx_host, host_str);
    self->tx_port = port;
    return 0;
}

/* Whether addr is the (host, port) tx_addr was parsed from, without parsing it:
 * the same host str (or an equal one) and an int port of the same value. */
static int
same_destination(const DatagramIo *self, PyObject *addr)
{
    if (self->tx_host == NULL || !PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) != 2) {
        return 0;
    }
    PyObject *host = PyTuple_GET_ITEM(addr, 0);
    PyObject *port = PyTuple_GET_ITEM(addr, 1);
    if (host != self->tx_host
        && !(PyUnicode_CheckExact(host) && PyUnicode_Compare(host, self->tx_host) == 0)) {
        return 0;
    }
    if (!PyLong_CheckExact(port)) {
        return 0;
    }
    int overflow;
    long value = PyLong_AsLongAndOverflow(port, &overflow);
    return !overflow && value == self->tx_port;
}

static PyObject *
DatagramIo_send(DatagramIo *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send(datagram, addr) takes 2 arguments");
        return NULL;
    }
    if (self->buffer == NULL) {
        PyErr_SetString(PyExc_ValueError, "DatagramIo not initialised");
        return NULL;
    }
    if (!same_destination(self, args[1]) && parse_destination(self, args[1]) < 0) {
        return NULL;
    }
    Py_buffer datagram;
    if (PyObject_GetBuffer(args[0], &datagram, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    ssize_t n;
    for (;;) {
        n = sendto(self->fd, datagram.buf, (size_t)datagram.len, 0,
                   (const struct sockaddr *)&self->tx_addr, self->tx_len);
        if (n >= 0 || errno != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&datagram);
            return NULL;
        }
    }
    PyBuffer_Release(&datagram);
    if (n < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef DatagramIo_methods[] = {
    {"recv", (PyCFunction)DatagramIo_recv, METH_NOARGS,
     "recv() -> (bytes, (host, port)) | None: one datagram, or None when none waits"},
    {"send", (PyCFunction)(void (*)(void))DatagramIo_send, METH_FASTCALL,
     "send(datagram, addr) -> None: one datagram to addr, a (host, port) tuple"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DatagramIoType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "voxgate.transports._datagram.DatagramIo",
    .tp_doc = "DatagramIo(fd, family, max_datagram_bytes): a UDP socket's reads and writes",
    .tp_basicsize = sizeof(DatagramIo),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DatagramIo_init,
    .tp_dealloc = (destructor)DatagramIo_dealloc,
    .tp_methods = DatagramIo_methods,
};

static struct PyModuleDef datagram_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "voxgate.transports._datagram",
    .m_doc = "An RTP leg's UDP reads and writes (see voxgate.transports.datagram).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__datagram(void)
{
    if (PyType_Ready(&DatagramIoType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&datagram_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "DatagramIo", (PyObject *)&DatagramIoType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
