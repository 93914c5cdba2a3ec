//! Tests that need a network namespace of their own (root): the thread that runs one moves
//! into a new namespace, with loopback up, and what it sets up there stays there.

use std::io;
use std::process::Command;

use ewii_tests::require;

/// Runs `f` on a thread of its own in a new network namespace with loopback up, on a
/// current-thread runtime. Returns why it could not run here, if it could not (`f` too).
pub(crate) fn in_own_netns<F, Fut>(f: F) -> Option<String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<String>>,
{
    std::thread::spawn(move || {
        if let Err(e) = unshare_net() {
            return Some(format!("unshare(CLONE_NEWNET): {e}"));
        }
        // Children inherit this thread's namespace.
        if let Err(why) = run("ip", &["link", "set", "lo", "up"]) {
            return Some(why);
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .unwrap()
}

/// Moves this thread (only) into a new network namespace.
#[allow(unsafe_code)]
fn unshare_net() -> io::Result<()> {
    // SAFETY: unshare(2) with a flag and no pointers; it changes the calling thread's
    // namespace only, and that thread ends with the test.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn skip_or_fail(why: Option<String>) {
    if let Some(why) = why {
        assert!(
            !require("EWII_REQUIRE_PRIVILEGED"),
            "EWII_REQUIRE_PRIVILEGED=1 but this test cannot run: {why}"
        );
        println!("SKIPPED: {why}");
    }
}
