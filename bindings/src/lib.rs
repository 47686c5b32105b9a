//! The core of the Python and Go SDKs (see `docs/bindings.md`): every operation is a method
//! name and a JSON object of arguments in and one JSON document out, `{"ok": value}` or
//! `{"error": {"kind", "message"}}`; sandboxes, running commands and streams stay here in a
//! table and cross as integer handles. The PyO3 extension (`python/`) awaits [`call`] on
//! [`runtime`]; the C ABI (`ffi/`) blocks a thread in [`call_blocking`].
#![forbid(unsafe_code)]

mod cancel;
mod config;
mod error;
mod install;
mod methods;
mod table;
mod values;

use std::sync::OnceLock;

use futures_util::FutureExt;
use serde_json::{json, Value};

pub use cancel::{cancel, cancel_free, cancel_new};
pub use error::{BindError, Kind};

/// The runtime every call runs on (made on first use; its worker threads outlive callers).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("msb-bindings")
            .build()
            // Without a runtime nothing can be served; this fails only when the process
            // cannot make threads or an epoll fd at all.
            .unwrap_or_else(|e| panic!("cannot start the microsandbox runtime: {e}"))
    })
}

/// The version of this library (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs one call and returns its answer document. A panic in the SDK comes back as an
/// error of kind `internal`, never across the boundary.
pub async fn call(method: &str, args_json: &str) -> String {
    let result = match serde_json::from_str::<Value>(args_json) {
        Ok(Value::Object(args)) => std::panic::AssertUnwindSafe(methods::dispatch(method, args))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                Err(BindError::new(
                    Kind::Internal,
                    format!("{method} failed inside the binding: {what}"),
                ))
            }),
        Ok(_) => Err(BindError::new(
            Kind::InvalidArgument,
            format!("the arguments of {method} must be a JSON object"),
        )),
        Err(e) => Err(BindError::new(
            Kind::InvalidArgument,
            format!("the arguments of {method} are not JSON: {e}"),
        )),
    };
    answer(result)
}

/// [`call`] on the calling thread (which must not be one of the runtime's), ended early by
/// the cancel token `cancel` (0: none) with an error of kind `cancelled`.
pub fn call_blocking(method: &str, args_json: &str, cancel: u64) -> String {
    let token = cancel::lookup(cancel);
    runtime().block_on(cancellable(method, call(method, args_json), token))
}

/// `work`'s answer, or a `cancelled` error as soon as `token` fires.
async fn cancellable(
    method: &str,
    work: impl std::future::Future<Output = String>,
    token: Option<std::sync::Arc<cancel::Token>>,
) -> String {
    let Some(token) = token else {
        return work.await;
    };
    tokio::select! {
        biased;
        () = token.fired() => answer(Err(BindError::new(
            Kind::Cancelled,
            format!("{method} was cancelled"),
        ))),
        answer = work => answer,
    }
}

fn answer(result: Result<Value, BindError>) -> String {
    match result {
        Ok(v) => json!({ "ok": v }),
        Err(e) => json!({ "error": e.to_json() }),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &str, args: &str) -> Value {
        let answer = call_blocking(method, args, 0);
        serde_json::from_str(&answer).expect("the answer is JSON")
    }

    #[test]
    fn arguments_that_are_not_an_object_are_invalid() {
        for args in ["", "[]", "nope", "3"] {
            let a = run("version", args);
            assert_eq!(a["error"]["kind"], "invalid_argument", "{args}: {a}");
        }
    }

    #[test]
    fn unknown_methods_and_fields_are_invalid() {
        assert_eq!(run("nope", "{}")["error"]["kind"], "invalid_argument");
        let a = run("version", r#"{"extra": 1}"#);
        assert_eq!(a["error"]["kind"], "invalid_argument");
        assert!(a["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("extra"));
    }

    #[test]
    fn version_is_the_workspace_version() {
        assert_eq!(run("version", "{}")["ok"]["sdk"], VERSION);
    }

    #[test]
    fn a_released_or_unknown_handle_is_invalid() {
        let a = run(
            "sandbox.exec",
            r#"{"handle": 9007199254740991, "cmd": "true"}"#,
        );
        assert_eq!(a["error"]["kind"], "invalid_handle", "{a}");
        assert_eq!(
            run("release", r#"{"handle": 9007199254740991}"#)["error"]["kind"],
            "invalid_handle"
        );
    }

    #[test]
    fn a_fired_token_ends_its_call_and_others_are_untouched() {
        let slow = || async {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            String::from("done")
        };
        let t = cancel_new();
        assert_ne!(t, 0);
        // Fired from another thread while the call waits.
        let firer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            cancel(t);
        });
        let a = runtime().block_on(cancellable("slow", slow(), cancel::lookup(t)));
        firer.join().expect("firer");
        let a: Value = serde_json::from_str(&a).expect("JSON");
        assert_eq!(a["error"]["kind"], "cancelled", "{a}");
        // Fired before the call: ends it at once.
        let a = runtime().block_on(cancellable("slow", slow(), cancel::lookup(t)));
        assert!(a.contains("cancelled"), "{a}");
        cancel_free(t);
        // A freed or unknown token is no token.
        assert!(cancel::lookup(t).is_none());
        let quick = async { String::from("done") };
        assert_eq!(
            runtime().block_on(cancellable("quick", quick, cancel::lookup(t))),
            "done"
        );
    }
}
