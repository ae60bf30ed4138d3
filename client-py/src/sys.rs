//! The binding's unsafe boundary: raw views of Python buffer-protocol memory.

use client::Region;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A buffer export held open: while it lives, the exporter keeps the memory in
/// place (a bytearray refuses to resize, a NumPy array cannot be freed).
#[derive(Debug)]
pub struct Export(PyBuffer<u8>);

/// A region over a writable, C-contiguous byte buffer, holding the export that
/// keeps its memory in place until the region is dropped (after unregistering
/// and every connection that could write into it has ended).
pub fn buffer_region(object: &Bound<'_, PyAny>) -> PyResult<Region> {
    let buffer = export(object)?;
    if buffer.readonly() {
        return Err(PyValueError::new_err("the buffer is read-only; a load target must be writable"));
    }
    let (pointer, len) = (buffer.buf_ptr().cast::<u8>(), buffer.len_bytes());
    // SAFETY: the buffer is writable and C-contiguous (checked) and spans
    // `len` from `pointer`; the region holds the export, which keeps it valid,
    // for as long as the region lives.
    Ok(unsafe { Region::from_raw_kept_by(pointer, len, Export(buffer)) })
}

/// A region over raw memory named by the engine (`tensor.data_ptr()`).
///
/// The Python API documents the contract that Rust cannot check: the memory must
/// stay valid, and unused by the engine for loads in flight, while it is
/// registered (until `unregister`, or the client and its loads are gone).
/// `owner` (the tensor, say) is held by the region until it is dropped.
pub fn pointer_region(pointer: usize, length: usize, owner: Option<PyObject>) -> PyResult<Region> {
    if pointer == 0 || length == 0 {
        return Err(PyValueError::new_err("register_pointer needs a non-null pointer and a positive length"));
    }
    // SAFETY: upheld by the Python caller per the documented contract above, as
    // with any pointer handed to a C extension (ctypes, DLPack consumers).
    Ok(unsafe { Region::from_raw_kept_by(pointer as *mut u8, length, owner) })
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
    /// The exported bytes, for as long as the export is held (the GIL may be
    /// released meanwhile).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the export is open (held by `self`, which the slice borrows) and
        // C-contiguous (checked), and spans `len_bytes` from `buf_ptr`. Another
        // Python thread could write to it meanwhile, as with any C extension
        // reading a buffer without the GIL; the bytes are only copied out (sent),
        // never trusted for memory safety.
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr().cast::<u8>(), self.0.len_bytes()) }
    }
}

/// Device memory an engine named by pointer and length (`load_to_device`).
pub fn engine_device_region(device: &std::sync::Arc<client::gpu::GpuDevice>, pointer: u64, length: usize) -> client::gpu::DeviceRegion {
    // SAFETY: the Python API's documented contract (`Client.load_to_device`):
    // the pointer names `length` bytes of memory on that device (a tensor's
    // storage) that the engine keeps alive and does not read before the layers
    // are reported; we cannot check a raw device pointer from here.
    unsafe { client::gpu::DeviceRegion::from_raw(device, pointer, length) }
}
