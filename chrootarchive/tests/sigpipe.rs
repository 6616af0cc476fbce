//! With `SIGPIPE` at its default disposition (a C program or a library host that did not ignore
//! it), a child dying while the parent writes must give `EPIPE`, not kill the caller. Alone in
//! its own test binary because it changes a process-wide disposition.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use archive::ApplyOptions;
use chrootarchive::Error;
use chrootarchive::TestFault;
use nix::sys::signal::{SigHandler, Signal, signal};

#[test]
fn a_dying_child_does_not_kill_the_caller_with_sigpipe() {
    if !common::need_root("a_dying_child_does_not_kill_the_caller_with_sigpipe") {
        return;
    }
    // SAFETY: restoring the default disposition; no handler function is installed.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.unwrap();
    let t = tempfile::tempdir().unwrap();
    let mut layer = common::tar_of(&[common::file("f", &[1u8; 4 << 20])]);
    layer.extend(std::iter::repeat_n(0u8, 8 << 20));
    for fault in [TestFault::KillChild, TestFault::PanicChild] {
        let err = chrootarchive::apply_layer_with_fault(
            t.path(),
            &layer[..],
            &ApplyOptions::default(),
            fault,
        )
        .unwrap_err();
        assert!(matches!(err, Error::ChildDied { .. }), "{err}");
    }
    // Still alive, and no SIGPIPE left pending to kill us later.
    let mask = nix::sys::signal::SigSet::thread_get_mask().unwrap();
    assert!(!mask.contains(Signal::SIGPIPE), "SIGPIPE left blocked");
}
