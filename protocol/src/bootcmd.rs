//! The command the agent runs, passed on the kernel command line.
//!
//! `msb.cmd=<base64url, no padding, of the arguments joined by NUL>`. Arguments are
//! arbitrary bytes except NUL (as in `execve`); base64url keeps the kernel's parser away from
//! spaces and quotes. The kernel ignores parameters with a dot for init's environment, so the
//! agent reads it from `/proc/cmdline`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Kernel command-line key carrying the command.
pub const CMD_KEY: &str = "msb.cmd";
/// Kernel command-line key carrying the hostname.
pub const HOSTNAME_KEY: &str = "msb.hostname";

/// Why a command cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootCmdError {
    /// There is no program to run.
    #[error("the command is empty")]
    Empty,
    /// An argument holds a NUL byte, which `execve` cannot pass.
    #[error("argument {0} contains a NUL byte")]
    Nul(usize),
    /// The value is not valid base64url.
    #[error("the command parameter is not valid base64url")]
    Encoding,
}

/// Encodes `args` as the `msb.cmd=` parameter (key included).
pub fn encode(args: &[impl AsRef<[u8]>]) -> Result<String, BootCmdError> {
    if args.is_empty() {
        return Err(BootCmdError::Empty);
    }
    let mut joined = Vec::new();
    for (i, a) in args.iter().enumerate() {
        let a = a.as_ref();
        if a.contains(&0) {
            return Err(BootCmdError::Nul(i));
        }
        if i > 0 {
            joined.push(0);
        }
        joined.extend_from_slice(a);
    }
    Ok(format!("{CMD_KEY}={}", URL_SAFE_NO_PAD.encode(joined)))
}

/// Decodes the value of `msb.cmd` (without the key) into arguments.
pub fn decode(value: &str) -> Result<Vec<Vec<u8>>, BootCmdError> {
    let raw = URL_SAFE_NO_PAD
        .decode(value.trim())
        .map_err(|_| BootCmdError::Encoding)?;
    if raw.is_empty() {
        return Err(BootCmdError::Empty);
    }
    Ok(raw.split(|b| *b == 0).map(<[u8]>::to_vec).collect())
}

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
    fn round_trip_with_spaces_quotes_and_utf8() {
        let args = ["sh", "-c", "exit 3; echo \"a b\" 'c'", "héllo", ""];
        let param = encode(&args).expect("encodable");
        assert!(!param.contains(' '));
        let line = format!("console=ttyS0 {param} quiet");
        let value = find_param(&line, CMD_KEY).expect("present");
        let back = decode(value).expect("decodable");
        let want: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        assert_eq!(back, want);
    }

    #[test]
    fn bad_input_is_typed() {
        let none: [&str; 0] = [];
        assert_eq!(encode(&none), Err(BootCmdError::Empty));
        assert_eq!(encode(&["a", "b\0c"]), Err(BootCmdError::Nul(1)));
        assert_eq!(decode("!!"), Err(BootCmdError::Encoding));
        assert_eq!(decode(""), Err(BootCmdError::Empty));
    }

    #[test]
    fn find_param_needs_exact_key() {
        assert_eq!(find_param("msb.cmdx=1 msb.cmd=2", CMD_KEY), Some("2"));
        assert_eq!(find_param("quiet", CMD_KEY), None);
    }
}
