//go:build linux

package microsandbox

import (
	"os"
	"syscall"
	"unsafe"
)

// stdinTerminal reports whether this process's stdin is a terminal (the TCGETS ioctl
// succeeds, as isatty(3) checks); known is false when stdin cannot be examined.
func stdinTerminal() (isTerminal, known bool) {
	st, err := os.Stdin.Stat()
	if err != nil {
		return false, false
	}
	if st.Mode()&os.ModeCharDevice == 0 {
		return false, true // a pipe or a file
	}
	var t syscall.Termios
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, os.Stdin.Fd(), syscall.TCGETS, uintptr(unsafe.Pointer(&t)))
	return errno == 0, true
}
