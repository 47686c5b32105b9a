//! Parsing helpers: the values of options (`KEY=VALUE`, durations, sizes, times, volumes)
//! and the sides of `msb cp`.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use microsandbox::validate_name;

/// `KEY=VALUE` with a non-empty key (the value may be empty or hold more `=`).
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("{s:?}: the key is empty")),
        None => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    parse_key_value(s)
}

/// `KEY=VALUE`, or `KEY` alone for the host's value of it.
pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    if s.contains('=') {
        return parse_key_value(s);
    }
    if s.is_empty() {
        return Err("the variable name is empty".into());
    }
    match std::env::var(s) {
        Ok(v) => Ok((s.to_string(), v)),
        Err(_) => Err(format!(
            "{s:?}: expected KEY=VALUE (KEY alone takes the host's value, and {s} is not set here)"
        )),
    }
}

/// `30` (seconds), or numbers with units `ms`, `s`, `m`, `h`, `d`: `500ms`, `10m`, `1h30m`.
/// `--secret`'s value: `ENV=VALUE@HOST[,HOST...]`, or `ENV@HOST[,...]` to take the value
/// from the host's environment variable `ENV` (so it never sits in a shell history).
#[derive(Clone)]
pub(crate) struct SecretArg {
    pub env: String,
    /// `None`: the host's `$ENV`.
    pub value: Option<String>,
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretArg")
            .field("env", &self.env)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

pub(crate) fn parse_secret(s: &str) -> Result<SecretArg, String> {
    let (spec, hosts) = s
        .rsplit_once('@')
        .ok_or("expected ENV=VALUE@HOST[,HOST] or ENV@HOST[,HOST]")?;
    let hosts: Vec<String> = hosts.split(',').map(str::to_string).collect();
    if hosts.iter().any(String::is_empty) {
        return Err("an allowed host is empty".into());
    }
    let (env, value) = match spec.split_once('=') {
        Some((e, v)) => (e, Some(v.to_string())),
        None => (spec, None),
    };
    if env.is_empty() {
        return Err("the variable name is empty".into());
    }
    Ok(SecretArg {
        env: env.to_string(),
        value,
        hosts,
    })
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("invalid duration {s:?}: use seconds (30) or units (500ms, 30s, 10m, 2h, 1d)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<u64>().map(Duration::from_secs).map_err(|_| bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let (num, tail) = rest.split_at(digits);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            _ => None,
        }
        .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = tail;
    }
    Ok(total)
}

/// A duration in whole seconds.
pub(crate) fn parse_secs(s: &str) -> Result<u64, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?}: use whole seconds"));
    }
    Ok(d.as_secs())
}

/// A duration above zero.
pub(crate) fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: the interval must be above zero")),
        d => Ok(d),
    }
}

/// A size in MiB: `512`, `512M`, `512MiB`, `2G`, `2GiB` (any case).
pub(crate) fn parse_mib(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let bad = || format!("invalid size {s:?}: use MiB (512), or units (512M, 2G)");
    let n: u32 = num.parse().map_err(|_| bad())?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(bad()),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// An RFC 3339 time, or a duration before `now`.
fn parse_time_at(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        format!(
            "invalid time {s:?}: use RFC 3339 (2024-05-01T12:00:00Z) or a duration ago (30s, 10m, 2h)"
        )
    };
    let d = parse_duration(s).map_err(|_| bad())?;
    let d = chrono::TimeDelta::from_std(d).map_err(|_| bad())?;
    now.checked_sub_signed(d).ok_or_else(bad)
}

pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    parse_time_at(s, Utc::now())
}

/// A `--volume`: host directory `host` at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BindSpec {
    pub(crate) guest: String,
    pub(crate) host: PathBuf,
    pub(crate) readonly: bool,
}

/// A `--named-volume`: the volume `name` at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamedSpec {
    pub(crate) guest: String,
    pub(crate) name: String,
    pub(crate) readonly: bool,
}

/// A `--tmpfs` at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TmpfsSpec {
    pub(crate) guest: String,
    pub(crate) size_mib: Option<u32>,
}

/// `GUEST=SOURCE[:ro|:rw]` -> (guest, source, readonly).
fn parse_mount(s: &str, what: &str) -> Result<(String, String, bool), String> {
    let Some((guest, rest)) = s.split_once('=') else {
        return Err(format!(
            "{s:?}: expected GUEST={what}[:ro], e.g. /data={}",
            if what == "HOST" { "./data" } else { "cache" }
        ));
    };
    let (source, readonly) = if let Some(h) = rest.strip_suffix(":ro") {
        (h, true)
    } else if let Some(h) = rest.strip_suffix(":rw") {
        (h, false)
    } else {
        (rest, false)
    };
    if !guest.starts_with('/') {
        return Err(format!("{s:?}: the guest path {guest:?} must be absolute"));
    }
    if source.is_empty() {
        return Err(format!("{s:?}: the {} is empty", what.to_lowercase()));
    }
    Ok((guest.to_string(), source.to_string(), readonly))
}

pub(crate) fn parse_bind(s: &str) -> Result<BindSpec, String> {
    let (guest, host, readonly) = parse_mount(s, "HOST")?;
    Ok(BindSpec {
        guest,
        host: PathBuf::from(host),
        readonly,
    })
}

pub(crate) fn parse_named(s: &str) -> Result<NamedSpec, String> {
    let (guest, name, readonly) = parse_mount(s, "NAME")?;
    Ok(NamedSpec {
        guest,
        name,
        readonly,
    })
}

pub(crate) fn parse_tmpfs(s: &str) -> Result<TmpfsSpec, String> {
    let (guest, size) = match s.split_once('=') {
        Some((g, size)) => (g, Some(parse_mib(size)?)),
        None => (s, None),
    };
    if !guest.starts_with('/') {
        return Err(format!("{s:?}: the guest path {guest:?} must be absolute"));
    }
    Ok(TmpfsSpec {
        guest: guest.to_string(),
        size_mib: size,
    })
}

/// One side of `msb cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Host(PathBuf),
    Guest { sandbox: String, path: String },
}

/// `NAME:/path` (a valid sandbox name, then an absolute path) is in a sandbox; anything
/// else is a host path.
pub(crate) fn parse_location(s: &str) -> Location {
    if let Some((name, path)) = s.split_once(':') {
        if path.starts_with('/') && validate_name(name).is_ok() {
            return Location::Guest {
                sandbox: name.to_string(),
                path: path.to_string(),
            };
        }
    }
    Location::Host(PathBuf::from(s))
}

/// The last component of a guest path (`None` for `/`).
pub(crate) fn guest_file_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

/// Words of the `--entrypoint` values.
pub(crate) fn entrypoint_words(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::rfc3339;

    #[test]
    fn key_values_parse() {
        assert_eq!(parse_key_value("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
        assert_eq!(parse_env("X=1"), Ok(("X".into(), "1".into())));
        assert!(parse_env("").is_err());
        assert!(parse_env("MSB_TEST_SURELY_UNSET_VARIABLE").is_err());
        if let Ok(path) = std::env::var("PATH") {
            assert_eq!(parse_env("PATH"), Ok(("PATH".into(), path)));
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 5s "), Ok(Duration::from_secs(5)));
        for bad in [
            "",
            "s",
            "10x",
            "-5",
            "1.5h",
            "m10",
            "10 m",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_secs("2m"), Ok(120));
        assert!(parse_secs("1500ms").is_err());
        assert!(parse_interval("0").is_err());
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("512MiB"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("2gib"), Ok(2048));
        assert_eq!(parse_mib("0"), Ok(0));
        for bad in ["", "G", "12T", "-1", "4294967295G"] {
            assert!(parse_mib(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_parse() {
        let now = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            parse_time_at("10m", now).map(rfc3339),
            Ok("2024-05-01T11:50:00.000Z".to_string())
        );
        assert_eq!(
            parse_time_at("2024-05-01T14:00:00+02:00", now).map(rfc3339),
            Ok("2024-05-01T12:00:00.000Z".to_string())
        );
        assert!(parse_time_at("yesterday", now).is_err());
    }

    #[test]
    fn volume_specs_parse() {
        assert_eq!(
            parse_bind("/data=./data"),
            Ok(BindSpec {
                guest: "/data".into(),
                host: "./data".into(),
                readonly: false
            })
        );
        assert_eq!(
            parse_bind("/src=/home/me/src:ro"),
            Ok(BindSpec {
                guest: "/src".into(),
                host: "/home/me/src".into(),
                readonly: true
            })
        );
        assert_eq!(parse_bind("/a=b=c:rw").map(|b| b.host), Ok("b=c".into()));
        for bad in ["./data:/data", "data=./data", "/data=", "/data=:ro"] {
            assert!(parse_bind(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_named("/cache=pip-cache:ro"),
            Ok(NamedSpec {
                guest: "/cache".into(),
                name: "pip-cache".into(),
                readonly: true
            })
        );
        assert!(parse_named("/cache").is_err());
        assert_eq!(
            parse_tmpfs("/scratch"),
            Ok(TmpfsSpec {
                guest: "/scratch".into(),
                size_mib: None
            })
        );
        assert_eq!(
            parse_tmpfs("/scratch=1G").map(|t| t.size_mib),
            Ok(Some(1024))
        );
        assert!(parse_tmpfs("scratch").is_err());
        assert!(parse_tmpfs("/scratch=lots").is_err());
    }

    #[test]
    fn copy_locations_are_told_apart() {
        assert_eq!(
            parse_location("web:/etc/hosts"),
            Location::Guest {
                sandbox: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            parse_location("a.b-c_d:/x"),
            Location::Guest {
                sandbox: "a.b-c_d".into(),
                path: "/x".into()
            }
        );
        // Any valid sandbox name, spaces and all (write ./x for such a host path).
        assert_eq!(
            parse_location("my box:/x"),
            Location::Guest {
                sandbox: "my box".into(),
                path: "/x".into()
            }
        );
        for host in [
            "./web:/etc",
            "/tmp/a:/b",
            "web:rel",
            "file.txt",
            "tab\tname:/x",
            ":/x",
        ] {
            assert_eq!(
                parse_location(host),
                Location::Host(host.into()),
                "{host:?}"
            );
        }
        assert_eq!(guest_file_name("/etc/hosts"), Some("hosts"));
        assert_eq!(guest_file_name("/etc/"), Some("etc"));
        assert_eq!(guest_file_name("/"), None);
    }

    #[test]
    fn entrypoints_split_on_whitespace() {
        assert_eq!(
            entrypoint_words(&["python3 -m".into(), "http.server".into()]),
            ["python3", "-m", "http.server"]
        );
        assert!(entrypoint_words(&["  ".into()]).is_empty());
    }
}
