//! The binding's unsafe boundary: raw views of Python buffer-protocol memory.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A buffer export held open: while it lives, the exporter keeps the memory in
/// place (a bytearray refuses to resize, a NumPy array cannot be freed).
#[derive(Debug)]
pub struct Export(PyBuffer<u8>);

/// Start and length of a writable, C-contiguous byte buffer, and the export that
/// keeps it valid.
pub fn writable_bytes(object: &Bound<'_, PyAny>) -> PyResult<(*mut u8, usize, Export)> {
    let buffer = export(object)?;
    if buffer.readonly() {
        return Err(PyValueError::new_err("the buffer is read-only; a load target must be writable"));
    }
    Ok((buffer.buf_ptr().cast(), buffer.len_bytes(), Export(buffer)))
}

/// A readable byte buffer for the duration of one call.
pub fn readable_bytes(object: &Bound<'_, PyAny>) -> PyResult<Export> {
    export(object).map(Export)
}

fn export(object: &Bound<'_, PyAny>) -> PyResult<PyBuffer<u8>> {
    let buffer = PyBuffer::<u8>::get(object).map_err(|error| {
        PyValueError::new_err(format!("expected a contiguous byte buffer (use memoryview(x).cast('B')): {error}"))
    })?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("the buffer must be C-contiguous"));
    }
    Ok(buffer)
}

impl Export {
    /// The exported bytes.
    ///
    /// # Safety
    /// No one may write to the buffer while the slice lives (the binding only uses
    /// it inside one call that sends it).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the export is open (held by `self`), C-contiguous (checked), and
        // spans `len_bytes` bytes from `buf_ptr`; the caller rules out writers.
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr().cast::<u8>(), self.0.len_bytes()) }
    }
}
