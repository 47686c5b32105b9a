//go:build !linux

package microsandbox

import "os"

// stdinTerminal reports whether this process's stdin may be a terminal: only a stdin
// that is not a character device is known not to be one here.
func stdinTerminal() (isTerminal, known bool) {
	st, err := os.Stdin.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice != 0 {
		return false, false
	}
	return false, true
}
