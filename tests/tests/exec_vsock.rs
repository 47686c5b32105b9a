//! End-to-end: exec over our virtio-vsock device, through the hybrid socket, to the real
//! agent in a real guest. One VM serves all the checks (a boot costs tens of seconds on PVM).

use std::time::Duration;

use msb_e2e::agent::{exec, Agent};
use msb_e2e::{host_kind, serve_vm};
use msb_protocol::frame::Frame;
use msb_protocol::message::{ErrorKind, Message, Rlimit, StdinMode, Tty, User};

#[test]
fn exec_over_vsock_on_one_booted_vm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vm.sock");
    let mut vmm = serve_vm(&sock, &dir.path().join("serial.log"), 256);
    eprintln!(
        "e2e [{}]: waiting for the agent on {}",
        host_kind(),
        sock.display()
    );
    let mut agent = Agent::connect(&sock, Duration::from_secs(400));

    // The VMM serving a running guest: every thread filtered, in its jail.
    msb_e2e::assert_confined(vmm.pid());

    // Exact bytes, binary included, and the exit code.
    let o = agent.run(
        1,
        exec(
            "sh",
            &["-c", "printf 'a\\000b\\377\\n'; printf err >&2; exit 7"],
        ),
    );
    assert_eq!(o.stdout, b"a\0b\xff\n");
    assert_eq!(o.stderr, b"err");
    assert_eq!(o.code, Some(7));

    // Stdin as bytes, and as a stream ending with EOF.
    let mut req = exec("cat", &[]);
    req.stdin = StdinMode::Bytes(b"in\0put".to_vec());
    assert_eq!(agent.run(2, req).stdout, b"in\0put");
    let mut req = exec("cat", &[]);
    req.stdin = StdinMode::Stream;
    agent.start(3, req);
    agent.send(&Frame::new(3, Message::Stdin(b"part1 ".to_vec())));
    agent.send(&Frame::new(3, Message::Stdin(b"part2".to_vec())));
    agent.send(&Frame::new(3, Message::Stdin(vec![])));
    let o = agent.wait(3);
    assert_eq!(
        (o.stdout.as_slice(), o.code),
        (&b"part1 part2"[..], Some(0))
    );

    // A signal, and a timeout.
    agent.start(4, exec("sleep", &["100"]));
    std::thread::sleep(Duration::from_secs(2));
    agent.send(&Frame::new(4, Message::Signal(15)));
    let o = agent.wait(4);
    assert_eq!((o.code, o.signal, o.timed_out), (None, Some(15), false));
    let mut req = exec("sleep", &["100"]);
    req.timeout_ms = Some(1500);
    let o = agent.run(5, req);
    assert_eq!((o.signal, o.timed_out), (Some(9), true));

    // Environment, working directory and user.
    let mut req = exec("sh", &["-c", "echo $GREETING; pwd; id -u"]);
    req.env = vec![("GREETING".into(), "hi there".into())];
    req.cwd = Some("/tmp".into());
    req.user = Some(User::Name("nobody".into()));
    assert_eq!(
        String::from_utf8_lossy(&agent.run(6, req).stdout),
        "hi there\n/tmp\n65534\n"
    );

    // Typed refusals.
    let o = agent.run(7, exec("no-such-command", &[]));
    assert_eq!(o.error.map(|e| e.0), Some(ErrorKind::NotFound));
    let mut req = exec("true", &[]);
    req.user = Some(User::Name("nosuchuser".into()));
    assert_eq!(
        agent.run(8, req).error.map(|e| e.0),
        Some(ErrorKind::InvalidRequest)
    );

    // A terminal of the requested size, resized while the command runs.
    let mut req = exec(
        "sh",
        &["-c", "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; stty size"],
    );
    req.tty = Some(Tty {
        rows: 33,
        cols: 101,
    });
    let o = agent.run(10, req);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "is-a-tty\r\n33 101\r\n");
    let mut req = exec("sh", &["-c", "read line; stty size"]);
    req.tty = Some(Tty { rows: 24, cols: 80 });
    agent.start(11, req);
    agent.send(&Frame::new(
        11,
        Message::Resize(Tty {
            rows: 50,
            cols: 132,
        }),
    ));
    agent.send(&Frame::new(11, Message::Stdin(b"go\n".to_vec())));
    let o = agent.wait(11);
    assert!(
        String::from_utf8_lossy(&o.stdout).ends_with("50 132\r\n"),
        "{:?}",
        String::from_utf8_lossy(&o.stdout)
    );

    // Resource limits.
    let mut req = exec("sh", &["-c", "ulimit -n"]);
    req.rlimits = vec![Rlimit {
        resource: "nofile".into(),
        soft: 64,
        hard: 64,
    }];
    assert_eq!(agent.run(12, req).stdout, b"64\n");
    let mut req = exec("true", &[]);
    req.rlimits = vec![Rlimit {
        resource: "bogus".into(),
        soft: 1,
        hard: 1,
    }];
    assert_eq!(
        agent.run(13, req).error.map(|e| e.0),
        Some(ErrorKind::InvalidRequest)
    );

    // A child that never reads its stdin does not freeze the connection: the signal after
    // 256 KB of unread stdin still gets through.
    let mut req = exec("sleep", &["100"]);
    req.stdin = StdinMode::Stream;
    agent.start(14, req);
    for _ in 0..4 {
        agent.send(&Frame::new(14, Message::Stdin(vec![b'x'; 64 * 1024])));
    }
    agent.send(&Frame::new(14, Message::Signal(15)));
    assert_eq!(agent.wait(14).signal, Some(15));

    // A client that reads slowly still gets all the output before the exit report.
    let size = 2 << 20;
    agent.start(15, exec("head", &["-c", &size.to_string(), "/dev/zero"]));
    std::thread::sleep(Duration::from_secs(3));
    let o = agent.wait(15);
    assert_eq!((o.stdout.len(), o.code), (size, Some(0)));

    // Twenty at once on one connection.
    for i in 0..20u32 {
        agent.start(100 + i, exec("sh", &["-c", &format!("echo session-{i}")]));
    }
    for i in 0..20u32 {
        let o = agent.wait(100 + i);
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("session-{i}\n"));
        assert_eq!(o.code, Some(0));
    }

    // A client that vanishes mid-stream does not wedge the agent.
    {
        let mut gone = Agent::connect(&sock, Duration::from_secs(60));
        gone.start(1, exec("sh", &["-c", "while :; do echo spam; done"]));
        std::thread::sleep(Duration::from_millis(500));
    }
    let o = agent.run(9, exec("echo", &["still here"]));
    assert_eq!(o.stdout, b"still here\n");

    // Shutdown ends the VM cleanly.
    agent.send(&Frame::new(0, Message::Shutdown));
    let status = vmm.wait();
    assert_eq!(status.code(), Some(0));
}
