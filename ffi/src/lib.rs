//! The C ABI of the SDK (`include/microsandbox.h`): strings in, one JSON answer out, for the
//! Go module (cgo). Everything but moving C strings is in `msb-bindings`.

use std::ffi::{c_char, CStr, CString};

/// An answer as a C string the caller frees with [`msb_string_free`]. JSON escapes control
/// characters, so an answer never holds a NUL; should one ever, it is cut there.
fn into_c(answer: String) -> *mut c_char {
    let c = CString::new(answer).unwrap_or_else(|e| {
        let end = e.nul_position();
        let mut bytes = e.into_vec();
        bytes.truncate(end);
        CString::new(bytes).unwrap_or_default()
    });
    c.into_raw()
}

/// Reads a C string argument; `None` for NULL or text that is not UTF-8.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string that outlives the call.
unsafe fn read<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: not NULL, and the caller promises a NUL-terminated string alive for the call.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

fn bad_argument(what: &str) -> *mut c_char {
    into_c(format!(
        r#"{{"error":{{"kind":"invalid_argument","message":"{what} must be a non-NULL UTF-8 string"}}}}"#
    ))
}

/// Runs `method` with `args_json`; blocks until the answer. See the header.
///
/// # Safety
/// `method` and `args_json` are NULL or valid NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn msb_call(
    method: *const c_char,
    args_json: *const c_char,
    cancel: u64,
) -> *mut c_char {
    // SAFETY: the caller's promise, passed on.
    let Some(method) = (unsafe { read(method) }) else {
        return bad_argument("method");
    };
    // SAFETY: as above.
    let Some(args) = (unsafe { read(args_json) }) else {
        return bad_argument("args_json");
    };
    into_c(msb_bindings::call_blocking(method, args, cancel))
}

/// Frees an answer of [`msb_call`].
///
/// # Safety
/// `s` is NULL or a string [`msb_call`] returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn msb_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: made by CString::into_raw in into_c and not freed before (the caller's
        // promise).
        drop(unsafe { CString::from_raw(s) });
    }
}

/// A new cancel token.
#[no_mangle]
pub extern "C" fn msb_cancel_new() -> u64 {
    msb_bindings::cancel_new()
}

/// Fires a cancel token.
#[no_mangle]
pub extern "C" fn msb_cancel(token: u64) {
    msb_bindings::cancel(token);
}

/// Forgets a cancel token.
#[no_mangle]
pub extern "C" fn msb_cancel_free(token: u64) {
    msb_bindings::cancel_free(token);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &[u8], args: &[u8]) -> String {
        let m = CString::new(method).expect("method");
        let a = CString::new(args).expect("args");
        // SAFETY: both are valid C strings alive for the call.
        let p = unsafe { msb_call(m.as_ptr(), a.as_ptr(), 0) };
        assert!(!p.is_null());
        // SAFETY: msb_call returns a valid C string.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: returned by msb_call, freed once.
        unsafe { msb_string_free(p) };
        s
    }

    #[test]
    fn calls_cross_as_c_strings() {
        assert!(call(b"version", b"{}").contains(r#""sdk""#));
        assert!(call(b"version", b"{").contains("invalid_argument"));
        assert!(call(b"version", b"{\"x\":\"\xff\"}").contains("invalid_argument"));
        // SAFETY: NULL is allowed and answered.
        let p = unsafe { msb_call(std::ptr::null(), std::ptr::null(), 0) };
        // SAFETY: a valid answer, freed once.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: returned by msb_call, freed once.
        unsafe { msb_string_free(p) };
        assert!(
            s.contains("invalid_argument") && s.contains("method"),
            "{s}"
        );
        // SAFETY: NULL is ignored.
        unsafe { msb_string_free(std::ptr::null_mut()) };
    }

    #[test]
    fn tokens_are_never_zero() {
        let t = msb_cancel_new();
        assert_ne!(t, 0);
        msb_cancel(t);
        msb_cancel_free(t);
        msb_cancel(t);
    }
}
