//! Settings the VMM passes to the agent on the kernel command line. The kernel ignores
//! parameters with a dot for init's environment, so the agent reads them from
//! `/proc/cmdline`. Commands themselves travel over vsock ([`crate::message`]).

/// Kernel command-line key carrying the hostname.
pub const HOSTNAME_KEY: &str = "msb.hostname";

/// Finds `key=value` in a kernel command line and returns the value.
pub fn find_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_param_needs_exact_key() {
        let line = "quiet msb.hostnamex=1 msb.hostname=box";
        assert_eq!(find_param(line, HOSTNAME_KEY), Some("box"));
        assert_eq!(find_param("quiet", HOSTNAME_KEY), None);
    }
}
