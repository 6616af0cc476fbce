//! `driver_test!`: one test function per driver, given a body taking the driver's name.

/// Expands `driver_test!(name, |driver| body)` into a module `name` with a `vfs` test (always
/// run) and an `overlay` test (run as root, and always when `CI=true`; skipped with a printed
/// reason otherwise).
macro_rules! driver_test {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn vfs() {
                let body: fn(&'static str) = $body;
                body("vfs");
            }

            #[test]
            fn overlay() {
                if let Some(reason) = crate::util::skip_root_test() {
                    eprintln!("skipping overlay test: {reason}");
                    return;
                }
                let body: fn(&'static str) = $body;
                body("overlay");
            }

            #[test]
            fn overlay2() {
                if let Some(reason) = crate::util::skip_root_test() {
                    eprintln!("skipping overlay2 test: {reason}");
                    return;
                }
                let body: fn(&'static str) = $body;
                body("overlay2");
            }
        }
    };
}
