/* The C ABI of the microsandbox SDK (the `msb-ffi` crate, libmicrosandbox_ffi).
 *
 * One call carries a method name and a JSON object of arguments and returns one JSON
 * document, {"ok": value} or {"error": {"kind", "message", "fs_kind"?}}; objects are
 * integer handles. The methods, values and error kinds are in docs/bindings.md. */
#ifndef MICROSANDBOX_H
#define MICROSANDBOX_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Runs `method` with `args_json` (a JSON object, NUL-terminated UTF-8) and blocks the
 * calling thread until its answer. `cancel` is a token from msb_cancel_new (0: the call
 * cannot be cancelled). Never returns NULL; free the answer with msb_string_free. */
char *msb_call(const char *method, const char *args_json, uint64_t cancel);

/* Frees a string msb_call returned (NULL is ignored). */
void msb_string_free(char *s);

/* A new cancel token; 0 ("not cancellable") only when 65,536 tokens are live. */
uint64_t msb_cancel_new(void);

/* Fires a token: the call holding it ends with error kind "cancelled" (a token fired
 * before its call starts cancels that call at once). Unknown tokens are ignored. */
void msb_cancel(uint64_t token);

/* Forgets a token once its call has returned. */
void msb_cancel_free(uint64_t token);

#ifdef __cplusplus
}
#endif

#endif
