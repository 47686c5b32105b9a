package microsandbox

// The only cgo in the module: one function carrying a call to the C ABI of the
// microsandbox core (ffi/include/microsandbox.h, libmicrosandbox_ffi). Everything else
// in the package speaks JSON through the transport variable (call.go).

/*
#cgo CFLAGS: -I${SRCDIR}/../ffi/include
#cgo LDFLAGS: -L${SRCDIR}/../target/ffi -lmicrosandbox_ffi -Wl,-rpath,${SRCDIR}/../target/ffi
#include <stdlib.h>
#include "microsandbox.h"
*/
import "C"

import (
	"context"
	"unsafe"
)

// ffiTransport runs one call on the core: method and the JSON object of its arguments
// in, the answer document ({"ok": ...} or {"error": ...}) out. msb_call blocks this
// goroutine's thread; when ctx can be cancelled, a watcher goroutine fires the call's
// cancel token once ctx is done, which ends the call with error kind "cancelled" (a
// ctx done before the call fires it first: the core then answers "cancelled" without
// running the method).
func ffiTransport(ctx context.Context, method string, args []byte) []byte {
	cMethod := C.CString(method)
	defer C.free(unsafe.Pointer(cMethod))
	// JSON escapes every control character, so args holds no NUL byte.
	cArgs := C.CString(string(args))
	defer C.free(unsafe.Pointer(cArgs))

	var token C.uint64_t // 0: not cancellable
	if done := ctx.Done(); done != nil {
		token = C.msb_cancel_new()
		finished := make(chan struct{})
		watcher := make(chan struct{})
		go func() {
			defer close(watcher)
			select {
			case <-done:
				C.msb_cancel(token)
			case <-finished:
			}
		}()
		defer func() {
			close(finished)
			<-watcher // msb_cancel never runs after msb_cancel_free
			C.msb_cancel_free(token)
		}()
		if ctx.Err() != nil {
			// Done already: fired before the call starts, the token ends it before the
			// core runs any of it (the core looks at the token first), not maybe after.
			C.msb_cancel(token)
		}
	}

	answer := C.msb_call(cMethod, cArgs, token)
	defer C.msb_string_free(answer)
	return []byte(C.GoString(answer))
}
