/* Logging, for every part of the extension: see log_va(). */

#include "fusehook.h"

#include <stdarg.h>

static PyObject *logger;            /* logging.getLogger("kexecfs.fusehook") */

/* Takes the current exception (traceback attached) out of the error state. */
static PyObject *take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static void restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc,
                  PyException_GetTraceback(exc));
#endif
}

/*
 * Logs through the "kexecfs.fusehook" logger at the given level ("error",
 * "warning"), so the daemon's logging configuration applies (without one,
 * Python's last-resort handler still prints warnings and errors to stderr).
 * With with_exception, the current exception is consumed and logged with its
 * traceback.  Never leaves an exception set: pyfuse3 checks PyErr_Occurred()
 * after fuse_session_process_buf() and would stop its main loop.  If logging
 * itself fails, the exception goes to sys.unraisablehook (stderr) instead of
 * being lost.  Needs the GIL.
 */
static void log_va(const char *level, int with_exception, const char *format,
                   va_list va)
{
    PyObject *exc = NULL, *msg, *res = NULL;

    if (with_exception)
        exc = take_exception();
    msg = PyUnicode_FromFormatV(format, va);
    if (msg != NULL) {
        PyObject *method = PyObject_GetAttrString(logger, level);
        PyObject *args = Py_BuildValue("(sO)", "%s", msg);
        PyObject *kwargs = Py_BuildValue("{s:O}", "exc_info",
                                         exc != NULL ? exc : Py_False);

        if (method != NULL && args != NULL && kwargs != NULL)
            res = PyObject_Call(method, args, kwargs);
        Py_XDECREF(method);
        Py_XDECREF(args);
        Py_XDECREF(kwargs);
    }
    if (res == NULL) {
        PyErr_WriteUnraisable(msg);
        if (exc != NULL) {
            restore_exception(exc);
            exc = NULL;
            PyErr_WriteUnraisable(msg);
        }
    }
    Py_XDECREF(res);
    Py_XDECREF(msg);
    Py_XDECREF(exc);
}

void log_error(int with_exception, const char *format, ...)
{
    va_list va;

    va_start(va, format);
    log_va("error", with_exception, format, va);
    va_end(va);
}

void log_warning(const char *format, ...)
{
    va_list va;

    va_start(va, format);
    log_va("warning", 0, format, va);
    va_end(va);
}

void log_info(const char *format, ...)
{
    va_list va;

    va_start(va, format);
    log_va("info", 0, format, va);
    va_end(va);
}

int log_init(void)
{
    PyObject *logging = PyImport_ImportModule("logging");

    if (logging == NULL)
        return -1;
    logger = PyObject_CallMethod(logging, "getLogger", "s", "kexecfs.fusehook");
    Py_DECREF(logging);
    return logger == NULL ? -1 : 0;
}
