//! `microsandbox._core`: the extension under the Python package. It only carries strings:
//! `call_blocking` hands a method name and JSON arguments to the bindings core and returns
//! its JSON answer (`docs/bindings.md`), blocking the calling thread with the GIL released;
//! `microsandbox/_native.py` runs each call on a thread of its own and resolves an asyncio
//! future on the caller's loop, so no thread of the core's runtime ever touches Python
//! (which is what crashes an interpreter that exits while such a thread holds the GIL).
#![forbid(unsafe_code)]

use pyo3::prelude::*;

/// Runs one call to its answer (`{"ok": ...}` or `{"error": {...}}`), ended early with kind
/// `cancelled` when token `cancel` (0: none) fires. Releases the GIL while it waits.
#[pyfunction]
fn call_blocking(py: Python<'_>, method: String, args_json: String, cancel: u64) -> String {
    py.detach(|| msb_bindings::call_blocking(&method, &args_json, cancel))
}

/// A new cancel token (0 when too many are live: the call is then not cancellable).
#[pyfunction]
fn cancel_new() -> u64 {
    msb_bindings::cancel_new()
}

/// Fires a cancel token: the call holding it ends at once.
#[pyfunction]
fn cancel(token: u64) {
    msb_bindings::cancel(token);
}

/// Forgets a cancel token once its call has returned.
#[pyfunction]
fn cancel_free(token: u64) {
    msb_bindings::cancel_free(token);
}

/// The version of the core (the workspace's).
#[pyfunction]
fn version() -> &'static str {
    msb_bindings::VERSION
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(call_blocking, m)?)?;
    m.add_function(wrap_pyfunction!(cancel_new, m)?)?;
    m.add_function(wrap_pyfunction!(cancel, m)?)?;
    m.add_function(wrap_pyfunction!(cancel_free, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
